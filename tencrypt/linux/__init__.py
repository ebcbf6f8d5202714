"""I/O shells around the pure core: TUN, sockets, netlink, firewall, DNS sockets."""
