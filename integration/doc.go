// Package integration holds end-to-end tests of the l4lb binary. It has no
// code of its own: the tests build ./cmd/l4lb once, start it from a TOML
// string inside a network namespace, and send real traffic through it from
// client namespaces to backends in namespaces of their own.
//
// Usage (as root, since network namespaces need CAP_SYS_ADMIN and
// CAP_NET_ADMIN; iproute2 and iperf3 must be installed):
//
//	go test -count=1 -v ./integration/
//
// Each test builds its own topology, named l4t-<pid>-<test>-<role>, and
// deletes it when it ends, pass or fail:
//
//	client ns c1 (10.77.1.2.. , fd00:77:1::2..)  ──veth──┐
//	client ns c2 (10.77.2.2.. , fd00:77:2::2..)  ──veth──┤
//	                                             lb ns (VIP 10.77.0.1, fd00:77::1 on lo)
//	backend ns b1 (10.78.1.2, fd00:78:1::2)      ──veth──┤
//	backend ns b2 (10.78.2.2, fd00:78:2::2)      ──veth──┘
//
// Clients route everything to the lb namespace; l4lb listens on the VIP and
// dials the backends over their own links, so no namespace forwards packets.
package integration
