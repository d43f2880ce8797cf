"""Tools people use on top of a node directory: the inspector, the doctor, the demo.

May import: everything below (`node`, `switch`, `acquirer`, ...), never `cli`.
"""
