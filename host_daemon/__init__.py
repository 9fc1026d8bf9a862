"""The apf-emu host daemon: plays KVM and the VMM for one VM (guest RAM, EPT, APF state per vCPU)."""
