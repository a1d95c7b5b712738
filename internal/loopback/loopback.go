// Package loopback checks the addresses of the repository's load tools
// (scripts/udpload, scripts/reloadprobe): they make load, and load goes
// nowhere but this machine.
package loopback

import (
	"fmt"
	"net/netip"
)

// ParseAddrPort parses an IP:port that must be on the loopback range
// (127.0.0.0/8, ::1).
func ParseAddrPort(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return ap, err
	}
	if !ap.Addr().Unmap().IsLoopback() {
		return ap, fmt.Errorf("%s: only loopback addresses (127.0.0.0/8, ::1) are allowed", s)
	}
	return ap, nil
}
