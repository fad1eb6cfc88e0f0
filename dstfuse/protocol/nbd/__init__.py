"""The NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).

Sans-IO like our own protocol: `constants` holds the wire numbers, the
codecs turn bytes into events and events into bytes, and never touch a
socket or trio. The servers (export node, mount daemon) and the `nbd:` node
drive them.
"""
