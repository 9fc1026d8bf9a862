"""apf-emu's contract: the KVM APF ABI, the shared guest RAM, the wire and the log schema.

Both the host daemon and the guest agents import this package; it imports neither of them.
"""
