"""Pure domain rules and values shared by every part: typed errors, content rules, the site policy, amounts, HOST:PORT.

May import: the standard library only (and each other).
"""
