"""What makes a site: the site directory (keys, policy signing) and the roster of enrolled nodes, policies and revocations. Shared by nodes and the switch.

May import: `wire`, `identity`, `infra`, `domain`.
"""
