"""A meshpos node: its directory, its core (store + ledger + sales), and its service."""
