package l4

import (
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
