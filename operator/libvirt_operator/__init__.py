"""libvirt-operator: VirtualMachine, ISOImage and LibvirtHost resources reconciled onto libvirt hosts."""

__version__ = "0.1.0"
