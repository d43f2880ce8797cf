// The cashier app (meshpos/terminal/cashier_app.py serves it; protocols/terminal-api.yaml is the
// API it calls). Same origin only: the session cookie authorizes its calls; it never sees the
// API token. A card number typed here is sent once, in the sale request, and then cleared: it is
// never shown again, stored, or logged.
"use strict";

const TEXT = {
  en: {
    peers: "peers", uplink: "uplink", printer: "printer", battery: "battery", logout: "Log out",
    enter_pin: "Cashier PIN", ok: "OK", cash: "Cash", card: "Card", card_keyed: "Card (keyed)",
    card_reader: "Card reader", card_number: "Card number", expiry: "Expiry (MMYY)", charge: "Charge",
    retry: "Retry charge", today: "Today", status: "Status", time: "Time", amount: "Amount", method: "Method",
    void: "Void", confirm_void: "Confirm void", reprint: "Reprint", receipt_queued: "Receipt queued",
    no_amount: "Key in an amount first", no_method: "Choose cash or card", no_card: "Type the card number",
    network: "No answer from the terminal: tap the button again to retry (it will not charge twice)",
    no_pin: "No cashier PIN is set on this terminal: run `meshpos cashier-pin NODE_DIR` on it",
    st_pending: "Authorization pending", st_paid: "Paid in cash", st_approved: "Approved",
    st_declined: "Declined", st_expired: "Expired", st_voided: "Voided", st_reversed: "Reversed",
    st_rejected: "Rejected", st_refused: "Refused", st_deferred: "Deferred",
    left: "{t} left in the offline window", held: "held on {n} devices", held_one: "held on 1 device (this one)",
    auth_code: "auth code {c}", reason: "reason: {r}", code: "response code {c}",
    rc_05: "do not honour", rc_51: "insufficient funds", rc_54: "expired card", rc_14: "invalid card number",
    void_sent: "voided: the reversal is on its way to the acquirer",
    total: "Total", none: "no sales yet today",
    "dev_up": "up", "dev_down": "down", "dev_off": "off", "dev_checking": "checking", "dev_ok": "ok",
    "dev_none": "none", "dev_unreachable": "unreachable", "dev_paper_out": "paper out", "dev_cover_open": "cover open",
  },
  it: {
    peers: "nodi", uplink: "rete", printer: "stampante", battery: "batteria", logout: "Esci",
    enter_pin: "PIN cassiere", ok: "OK", cash: "Contanti", card: "Carta", card_keyed: "Carta (digitata)",
    card_reader: "Lettore carte", card_number: "Numero carta", expiry: "Scadenza (MMAA)", charge: "Incassa",
    retry: "Riprova", today: "Oggi", status: "Stato", time: "Ora", amount: "Importo", method: "Metodo",
    void: "Annulla", confirm_void: "Conferma annullo", reprint: "Ristampa", receipt_queued: "Scontrino in stampa",
    no_amount: "Digita prima un importo", no_method: "Scegli contanti o carta", no_card: "Digita il numero della carta",
    network: "Il terminale non risponde: tocca di nuovo il pulsante per riprovare (non addebita due volte)",
    no_pin: "Nessun PIN cassiere su questo terminale: esegui `meshpos cashier-pin NODE_DIR`",
    st_pending: "Autorizzazione in attesa", st_paid: "Pagato in contanti", st_approved: "Approvata",
    st_declined: "Rifiutata", st_expired: "Scaduta", st_voided: "Annullata", st_reversed: "Stornata",
    st_rejected: "Respinta", st_refused: "Non valida", st_deferred: "Rinviata",
    left: "{t} alla fine della finestra offline", held: "conservata su {n} dispositivi",
    held_one: "conservata su 1 dispositivo (questo)",
    auth_code: "codice autorizzazione {c}", reason: "motivo: {r}", code: "codice risposta {c}",
    rc_05: "non onorare", rc_51: "fondi insufficienti", rc_54: "carta scaduta", rc_14: "numero carta non valido",
    void_sent: "annullata: lo storno è in viaggio verso l'acquirer",
    total: "Totale", none: "ancora nessuna vendita oggi",
    "dev_up": "attiva", "dev_down": "assente", "dev_off": "spenta", "dev_checking": "verifica", "dev_ok": "ok",
    "dev_none": "nessuna", "dev_unreachable": "irraggiungibile", "dev_paper_out": "carta finita",
    "dev_cover_open": "coperchio aperto",
  },
};

const $ = (id) => document.getElementById(id);
const DOUBLE_TAP_MS = 1500; // a tap on "charge" this soon after a sale, with no new amount, is its double tap
const state = {
  lang: "en", setup: null, nodeId: null, pin: "", digits: "", method: null, attempt: null, busy: false, loggingIn: false,
  sales: new Map(), current: null, events: null, status: null, confirmVoid: null, soldAt: 0,
};

function t(key, vars) {
  let s = (TEXT[state.lang] && TEXT[state.lang][key]) || TEXT.en[key] || key;
  for (const [k, v] of Object.entries(vars || {})) s = s.replace("{" + k + "}", String(v));
  return s;
}

function uuid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function call(method, path, body, headers) {
  const init = { method, credentials: "same-origin", headers: Object.assign({}, headers || {}) };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = body; }
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401 && path.startsWith("/v1/")) showLogin();
  return { status: r.status, body: data };
}

function errorText(answer) {
  return (answer.body && answer.body.error && answer.body.error.message) || `HTTP ${answer.status}`;
}

// -- language ------------------------------------------------------------------------

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  $("lang").textContent = state.lang === "en" ? "IT" : "EN";
  $("expiry").placeholder = state.lang === "it" ? "MMAA" : "MMYY";
  $("charge").textContent = t(state.attempt && state.attempt.failed ? "retry" : "charge");
  renderStatus(); renderCurrent(); renderToday();
}

function setLanguage(lang) {
  state.lang = lang;
  try { localStorage.setItem("meshpos.lang", lang); } catch (e) { /* private mode: not kept */ }
  applyLanguage();
}

// -- login -----------------------------------------------------------------------------

function showLogin(message) {
  if (state.events) { state.events.close(); state.events = null; }
  $("app").hidden = true; $("logout").hidden = true; $("login").hidden = false;
  state.pin = ""; renderPin();
  $("login-error").textContent = message || (state.setup && !state.setup.pin_set ? t("no_pin") : "");
}

function renderPin() { $("pin-display").textContent = state.pin ? "\u2022".repeat(state.pin.length) : "\u00a0"; }

async function login() {
  // its own flag: a charge tapped while the till still loads today's sales must not be ignored
  if (state.loggingIn || !state.pin) return;
  state.loggingIn = true;
  try {
    const a = await call("POST", "/cashier/login", JSON.stringify({ pin: state.pin }));
    state.pin = ""; renderPin();
    if (a.status === 200) { $("login-error").textContent = ""; await start(); }
    else $("login-error").textContent = errorText(a);
  } catch (e) {
    $("login-error").textContent = t("network");
  } finally { state.loggingIn = false; }
}

async function logout() {
  await call("POST", "/cashier/logout");
  showLogin();
}

// -- selling ----------------------------------------------------------------------------

function decimals() { return state.setup ? state.setup.decimals : 2; }

function amountText(digits) {
  const d = decimals();
  const s = (digits || "0").replace(/^0+(?=\d)/, "").padStart(d + 1, "0");
  return d ? s.slice(0, -d) + "." + s.slice(-d) : s;
}

function formatMinor(minor) { return amountText(String(minor)); }

function edited() { // any change to what would be sent starts a new sale attempt
  state.attempt = null; $("charge").textContent = t("charge"); $("sell-error").textContent = "";
}

function keyDigit(k) {
  if (k === "clear") state.digits = "";
  else if (state.digits.length < 9) state.digits = (state.digits + k).replace(/^0+/, "");
  $("amount").textContent = amountText(state.digits);
  edited();
}

function chooseMethod(m) {
  state.method = m;
  for (const b of document.querySelectorAll(".method")) b.setAttribute("aria-pressed", String(b.dataset.method === m));
  $("card-form").hidden = m !== "card";
  edited();
}

function saleBody() {
  if (!state.digits || /^0*$/.test(state.digits)) throw new Error(t("no_amount"));
  if (!state.method) throw new Error(t("no_method"));
  const body = { amount: amountText(state.digits), method: state.method === "cash" ? "cash" : "card" };
  if (state.method === "reader") body.reader = true;
  if (state.method === "card") {
    const pan = $("pan").value.replace(/[\s-]/g, "");
    if (!pan) throw new Error(t("no_card"));
    body.card = { pan, expiry: $("expiry").value.trim() };
  }
  return JSON.stringify(body);
}

function clearCard() { $("pan").value = ""; $("expiry").value = ""; }

async function charge() {
  if (state.busy) return; // a second tap while the first is on its way
  let text;
  if (state.attempt && state.attempt.failed) {
    text = state.attempt.text; // the retry of an attempt whose answer was lost: same key, same body
  } else {
    if (!state.digits && Date.now() - state.soldAt < DOUBLE_TAP_MS) return; // the second tap of a double tap
    try { text = saleBody(); } catch (e) { $("sell-error").textContent = e.message; return; }
    state.attempt = { key: uuid(), text, failed: false };
  }
  state.busy = true; $("charge").disabled = true; $("sell-error").textContent = "";
  clearCard(); // sent once: never shown again
  try {
    const a = await call("POST", "/v1/sales", text, { "Idempotency-Key": state.attempt.key });
    if (a.status === 200 || a.status === 201) {
      state.attempt = null; state.digits = ""; state.soldAt = Date.now(); $("amount").textContent = amountText("");
      $("charge").textContent = t("charge");
      showSale(a.body, true);
    } else if (a.status >= 500) {
      state.attempt.failed = true; $("charge").textContent = t("retry");
      $("sell-error").textContent = errorText(a);
    } else { // refused: nothing was stored; the next tap is a new attempt
      state.attempt = null; $("charge").textContent = t("charge");
      $("sell-error").textContent = errorText(a);
    }
  } catch (e) {
    state.attempt.failed = true; $("charge").textContent = t("retry");
    $("sell-error").textContent = t("network");
  } finally {
    state.busy = false; $("charge").disabled = false;
  }
}

// -- sales and their state ------------------------------------------------------------

function showSale(sale, makeCurrent) {
  if (!sale || !sale.id) return;
  if (state.nodeId && sale.terminal !== state.nodeId) return;
  state.sales.set(sale.id, sale);
  if (makeCurrent) state.current = sale.id;
  renderCurrent(); renderToday();
}

function leftText(sale) {
  const ends = Date.parse(sale.window_ends_at);
  let s = Math.max(0, Math.floor((ends - Date.now()) / 1000));
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}`;
}

function detailOf(sale) {
  const parts = [];
  if (sale.status === "pending") {
    if (sale.window_ends_at) parts.push(t("left", { t: leftText(sale) }));
  }
  if (sale.status === "pending" || sale.status === "paid") {
    parts.push(sale.held_by > 1 ? t("held", { n: sale.held_by }) : t("held_one"));
  }
  if (sale.status === "approved" && sale.auth_code) parts.push(t("auth_code", { c: sale.auth_code }));
  if (sale.status === "declined") {
    if (sale.response_code) {
      const known = TEXT.en["rc_" + sale.response_code] ? " (" + t("rc_" + sale.response_code) + ")" : "";
      parts.push(t("code", { c: sale.response_code }) + known);
    }
  }
  if (sale.status === "approved" && sale.voided_at) parts.push(t("void_sent"));
  if (sale.reason && sale.status !== "approved") parts.push(t("reason", { r: sale.reason }));
  return parts.join(" \u00b7 ");
}

function methodText(sale) {
  return sale.method === "cash" ? t("cash") : `${t("card")} ${sale.card_brand || ""} \u2022${sale.card_last4 || ""}`;
}

function renderCurrent() {
  const box = $("current");
  const sale = state.current && state.sales.get(state.current);
  if (!sale) { box.hidden = true; return; }
  box.hidden = false;
  box.dataset.status = sale.status; box.dataset.saleId = sale.id; box.dataset.heldBy = String(sale.held_by);
  $("current-amount").textContent = `${sale.amount} ${sale.currency} \u00b7 ${methodText(sale)}`;
  $("current-state").textContent = t("st_" + sale.status);
  $("current-detail").textContent = detailOf(sale);
}

function renderToday() {
  if (!state.setup) return;
  const sales = Array.from(state.sales.values()).sort((a, b) => b.created_at_ms - a.created_at_ms);
  const tbody = $("sales").tBodies[0];
  tbody.replaceChildren();
  const totals = new Map();
  for (const sale of sales) {
    const row = totals.get(sale.status) || { cash: [0, 0], card: [0, 0] };
    row[sale.method][0] += 1; row[sale.method][1] += sale.amount_minor;
    totals.set(sale.status, row);
    const tr = document.createElement("tr");
    tr.dataset.id = sale.id; tr.dataset.status = sale.status;
    tr.addEventListener("click", (ev) => { // a tap on a sale shows it in full above
      if (ev.target.closest("button")) return;
      state.current = sale.id; renderCurrent();
    });
    const cells = [new Date(sale.created_at_ms).toLocaleTimeString(state.lang === "it" ? "it-IT" : "en-GB"),
                   sale.amount, methodText(sale), t("st_" + sale.status)];
    cells.forEach((text, i) => {
      const td = document.createElement("td"); td.textContent = text;
      if (i === 1) td.className = "num";
      tr.appendChild(td);
    });
    const actions = document.createElement("td"); actions.className = "actions";
    if (["pending", "paid", "approved"].includes(sale.status) && !sale.voided_at) {
      const v = document.createElement("button"); v.type = "button"; v.className = "void";
      v.textContent = state.confirmVoid === sale.id ? t("confirm_void") : t("void");
      v.addEventListener("click", () => voidSale(sale.id));
      actions.appendChild(v);
    }
    const p = document.createElement("button"); p.type = "button"; p.className = "reprint"; p.textContent = t("reprint");
    p.addEventListener("click", () => reprint(sale.id));
    actions.appendChild(p);
    tr.appendChild(actions);
    tbody.appendChild(tr);
  }
  const tb = $("totals").tBodies[0];
  tb.replaceChildren();
  const sum = { cash: [0, 0], card: [0, 0] };
  const rows = Array.from(totals.entries()).map(([status, v]) => [t("st_" + status), v, status]);
  for (const [, v] of rows) for (const m of ["cash", "card"]) { sum[m][0] += v[m][0]; sum[m][1] += v[m][1]; }
  if (!sales.length) rows.push([t("none"), sum, "none"]);
  else rows.push([t("total"), sum, "total"]);
  for (const [label, v, status] of rows) {
    const tr = document.createElement("tr"); tr.dataset.status = status;
    for (const text of [label, `${v.cash[0]} / ${formatMinor(v.cash[1])}`, `${v.card[0]} / ${formatMinor(v.card[1])}`]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    tb.appendChild(tr);
  }
}

async function voidSale(id) {
  if (state.confirmVoid !== id) { state.confirmVoid = id; renderToday(); return; }
  state.confirmVoid = null;
  const a = await call("POST", `/v1/sales/${encodeURIComponent(id)}/void`, "{}");
  if (a.status === 200) showSale(a.body, state.current === id);
  else $("toast").textContent = errorText(a);
  renderToday();
}

async function reprint(id) {
  const a = await call("POST", `/v1/sales/${encodeURIComponent(id)}/receipt`, JSON.stringify({ copy: "customer" }));
  $("toast").textContent = a.status === 202 ? t("receipt_queued") : errorText(a);
}

async function loadToday() {
  const midnight = new Date(); midnight.setHours(0, 0, 0, 0);
  let cursor = null;
  const fresh = new Map();
  for (let page = 0; page < 20; page++) {
    const q = `/v1/sales?limit=500&since=${midnight.getTime()}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
    const a = await call("GET", q);
    if (a.status !== 200) return;
    for (const sale of a.body.sales) if (sale.terminal === state.nodeId) fresh.set(sale.id, sale);
    cursor = a.body.next_cursor;
    if (!cursor) break;
  }
  state.sales = fresh;
  renderCurrent(); renderToday();
}

// -- node status ------------------------------------------------------------------------

function renderStatus() {
  const s = state.status;
  if (!s) return;
  const show = (id, text, good) => { const el = $(id); el.textContent = text; el.dataset.state = good ? "good" : "bad"; };
  show("st-peers", String(s.peers), s.peers > 0);
  // a state this page has no words for (a misconfigured printer's reason) is shown as the node says it
  const word = (v) => (TEXT.en["dev_" + String(v).replace(/ /g, "_")] ? t("dev_" + String(v).replace(/ /g, "_")) : String(v));
  show("st-uplink", word(s.uplink), s.uplink === "up");
  show("st-printer", word(s.printer), s.printer === "ok");
  show("st-battery", s.battery === null || s.battery === undefined ? "-" : `${s.battery}%`,
       s.battery === null || s.battery === undefined || s.battery > 20);
}

function listen() {
  if (state.events) state.events.close();
  const es = new EventSource("/v1/events");
  state.events = es;
  const onSale = (ev) => { try { showSale(JSON.parse(ev.data), false); } catch (e) { /* not JSON: ignored */ } };
  for (const kind of ["created", "replicated", "approved", "declined", "expired", "voided", "reversed", "rejected"]) {
    es.addEventListener("sale." + kind, onSale);
  }
  es.addEventListener("node.status", (ev) => { state.status = JSON.parse(ev.data); renderStatus(); });
  es.addEventListener("resync", () => { loadToday(); refreshStatus(); });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) { // refused (a lost session): look why
      setTimeout(checkSession, 2000);
    }
  };
}

async function refreshStatus() {
  const a = await call("GET", "/v1/status");
  if (a.status === 200) { state.status = a.body.summary; state.nodeId = a.body.summary.node_id; renderStatus(); }
}

async function checkSession() {
  const a = await call("GET", "/cashier/session");
  if (a.status !== 200) return;
  state.setup = a.body;
  $("st-name").textContent = a.body.name;
  $("method-card").disabled = !a.body.keyed;
  $("method-reader").disabled = !a.body.reader;
  if (a.body.logged_in) { if (!state.events) await start(); } else showLogin();
}

async function start() {
  $("login").hidden = true; $("app").hidden = false; $("logout").hidden = false;
  await refreshStatus();
  listen();
  await loadToday();
}

// -- wiring ----------------------------------------------------------------------------

function wire() {
  for (const b of document.querySelectorAll("#pin-keys [data-key]")) {
    b.addEventListener("click", () => {
      const k = b.dataset.key;
      if (k === "back") state.pin = state.pin.slice(0, -1);
      else if (state.pin.length < 12) state.pin += k;
      renderPin();
    });
  }
  $("login-ok").addEventListener("click", login);
  for (const b of document.querySelectorAll("#amount-keys [data-digit]")) b.addEventListener("click", () => keyDigit(b.dataset.digit));
  for (const b of document.querySelectorAll(".method")) b.addEventListener("click", () => chooseMethod(b.dataset.method));
  for (const id of ["pan", "expiry"]) $(id).addEventListener("input", edited);
  $("charge").addEventListener("click", charge);
  $("lang").addEventListener("click", () => setLanguage(state.lang === "en" ? "it" : "en"));
  $("logout").addEventListener("click", logout);
  setInterval(() => { renderCurrent(); }, 1000); // the offline window's countdown
}

async function main() {
  wire();
  const a = await call("GET", "/cashier/session");
  let stored = null;
  try { stored = localStorage.getItem("meshpos.lang"); } catch (e) { stored = null; }
  state.setup = a.body;
  state.lang = stored === "en" || stored === "it" ? stored : (a.body && a.body.language) || "en";
  applyLanguage();
  await checkSession();
}

document.addEventListener("DOMContentLoaded", main);
