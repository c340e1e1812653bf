from libvirt_operator.cli import main
main()
