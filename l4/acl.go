package l4

import (
	"net"
	"net/netip"
)

// accessList is a service's allow and deny lists, compiled into its route.
// The prefixes come from the config already canonical and unmapped, so a
// check is a linear scan of Prefix.Contains (a few instructions each) with
// no allocation; the config caps each list at config.MaxACLEntries.
type accessList struct {
	allow, deny []netip.Prefix
}

// admits reports whether a client at a may reach the service: not in deny,
// and in allow unless allow is empty. a must be unmapped (see clientAddr).
func (l *accessList) admits(a netip.Addr) bool {
	if containsAddr(l.deny, a) {
		return false
	}
	return len(l.allow) == 0 || containsAddr(l.allow, a)
}

// containsAddr reports whether a prefix of list holds a, whatever a's
// zone: Prefix.Contains is false for every zoned address, which would let
// fe80::1%eth0 past a deny of fe80::/10.
func containsAddr(list []netip.Prefix, a netip.Addr) bool {
	a = a.WithZone("")
	for _, p := range list {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// clientAddr is the remote address of an accepted connection with IPv4
// unmapped: a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d,
// which IPv4 prefixes would not contain. RemoteAddr returns the address
// cached at accept, so this allocates nothing.
func clientAddr(c *net.TCPConn) netip.AddrPort {
	ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// localAddr is the address a client connected to, unmapped like clientAddr.
func localAddr(c *net.TCPConn) netip.AddrPort {
	ap := c.LocalAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
