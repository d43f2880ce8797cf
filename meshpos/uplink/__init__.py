"""The node side of forwarding: reach the switch, decide what to forward, take results back.

Public API (what the node service calls):
  client.make_client_context(core_or_node_dir, policy=None) -> ssl context pinned to the switch
  client.forward_batch(switch_url, ssl_ctx, entries) -> list of signed result envelopes
  client.forward(switch_url, ssl_ctx, entries) -> ForwardReply (results, pending, refused, reversed)
  client.probe(switch_url, ssl_ctx) -> bool
  forwarder.HttpsTransport(core) -> forward / results / health over the policy's switch instances, failing over
  instances.InstanceChooser, instances.verdict -> which instance a request goes to, when it moves on (sans-IO)
  forwarder.run_forwarder(core, clock, has_uplink, reachable=..., task_status=...) -> the loop; started() gives the Forwarder
  reach.is_reachable(node_id, now_ms, linked, status) -> whether a lease holder counts as reachable (lease rule 1c)
"""
