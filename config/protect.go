package config

import (
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// ProxyProtocol is the PROXY protocol version l4lb speaks to backends.
type ProxyProtocol string

const (
	// ProxyNone sends nothing: backends see l4lb's address.
	ProxyNone ProxyProtocol = "none"
	// ProxyV1 sends the text header ("PROXY TCP4 ...\r\n"); TCP only.
	ProxyV1 ProxyProtocol = "v1"
	// ProxyV2 sends the binary header; on UDP services it prefixes every
	// datagram, as HAProxy and nginx expect.
	ProxyV2 ProxyProtocol = "v2"
)

// Protect holds the settings of a service that protect its backends and
// l4lb itself; Service embeds it.
type Protect struct {
	// MaxConnections bounds the service's open TCP connections; 0 is no
	// limit. Past it new connections are closed at once.
	MaxConnections int
	// MaxConnectionsPerSource bounds the open TCP connections of one client
	// IP address (the PROXY header's source when AcceptProxyProtocol); 0 is
	// no limit.
	MaxConnectionsPerSource int
	// Allow and Deny are the access lists, checked on the client address
	// (after a PROXY header) before any backend is dialed: a client in Deny
	// is refused; with Allow non-empty, so is a client outside it. Both are
	// canonical (masked) prefixes of unmapped addresses.
	Allow, Deny []netip.Prefix
	// HalfCloseTimeout replaces IdleTimeout (when shorter) once one side of
	// a TCP connection has finished sending: the connection is closed when
	// nothing has moved for that long. 0 keeps IdleTimeout.
	HalfCloseTimeout time.Duration
	// ProxyProtocol is what l4lb sends to backends first on each connection
	// (each datagram for UDP v2).
	ProxyProtocol ProxyProtocol
	// AcceptProxyProtocol requires a PROXY header (v1 or v2) from every
	// client; only addresses in TrustedProxies may connect then, and the
	// header must arrive within ProxyProtocolTimeout.
	AcceptProxyProtocol  bool
	TrustedProxies       []netip.Prefix
	ProxyProtocolTimeout time.Duration
}

// Defaults of the protection keys.
const (
	DefaultMaxConnections          = 0 // no limit
	DefaultMaxConnectionsPerSource = 0 // no limit
	// DefaultHalfCloseTimeout: a peer that has said it is done sending and
	// then keeps the connection without a byte for a minute is almost
	// always gone or stuck (HAProxy's client-fin/server-fin serve the same
	// purpose); an hour of idle_timeout would pin its descriptors.
	DefaultHalfCloseTimeout = time.Minute
	DefaultProxyProtocol    = ProxyNone
	// DefaultProxyProtocolTimeout bounds the wait for a PROXY header from
	// a trusted balancer, which sends it at once: seconds are generous,
	// and a slow sender cannot hold a descriptor for long.
	DefaultProxyProtocolTimeout = 5 * time.Second

	// MaxConnectionLimit bounds the max_connections keys: beyond 16 Mi
	// the descriptors alone exceed any RLIMIT_NOFILE.
	MaxConnectionLimit = 1 << 24
	// MaxACLEntries bounds allow, deny and trusted_proxies: the data path
	// scans them linearly per connection; longer lists belong in a
	// firewall (nftables sets), not here.
	MaxACLEntries = 1024
)

// fileServiceProtect holds the protection keys of [services.NAME];
// fileService embeds it.
type fileServiceProtect struct {
	MaxConnections          any `toml:"max_connections"`
	MaxConnectionsPerSource any `toml:"max_connections_per_source"`
	Allow                   any `toml:"allow"`
	Deny                    any `toml:"deny"`
	HalfCloseTimeout        any `toml:"half_close_timeout"`
	ProxyProtocol           any `toml:"proxy_protocol"`
	AcceptProxyProtocol     any `toml:"accept_proxy_protocol"`
	TrustedProxies          any `toml:"trusted_proxies"`
	ProxyProtocolTimeout    any `toml:"proxy_protocol_timeout"`
}

// serviceProtect fills the protection settings of svc, whose Protocol is
// already set.
func (v *validator) serviceProtect(at string, f *fileServiceProtect, svc *Service) {
	p := &svc.Protect
	tcpOnly := func(key string, raw any, why string) bool {
		return v.only(TCP, at+"."+key, raw, svc.Protocol, why)
	}
	if tcpOnly("max_connections", f.MaxConnections, ": UDP services cap flows with max_flows") {
		p.MaxConnections = int(v.integer(at+".max_connections", f.MaxConnections, DefaultMaxConnections, 0, MaxConnectionLimit))
	}
	if tcpOnly("max_connections_per_source", f.MaxConnectionsPerSource, "") {
		p.MaxConnectionsPerSource = int(v.integer(at+".max_connections_per_source", f.MaxConnectionsPerSource, DefaultMaxConnectionsPerSource, 0, MaxConnectionLimit))
	}
	p.Allow = v.prefixes(at+".allow", f.Allow)
	p.Deny = v.prefixes(at+".deny", f.Deny)
	if svc.Protocol == TCP {
		p.HalfCloseTimeout = v.duration(at+".half_close_timeout", f.HalfCloseTimeout, DefaultHalfCloseTimeout, true)
	} else {
		tcpOnly("half_close_timeout", f.HalfCloseTimeout, ": a UDP flow has no half-close")
	}

	p.ProxyProtocol = ProxyProtocol(v.enum(at+".proxy_protocol", f.ProxyProtocol, string(DefaultProxyProtocol), "none", "v1", "v2"))
	if svc.Protocol == UDP && p.ProxyProtocol == ProxyV1 {
		v.add(at+".proxy_protocol", "\"v1\" is for TCP only: use \"v2\", which UDP backends (HAProxy, nginx) read as a prefix of each datagram")
		p.ProxyProtocol = ProxyNone
	}

	if tcpOnly("accept_proxy_protocol", f.AcceptProxyProtocol, "") {
		p.AcceptProxyProtocol = v.boolean(at+".accept_proxy_protocol", f.AcceptProxyProtocol, false)
	}
	p.TrustedProxies = v.prefixes(at+".trusted_proxies", f.TrustedProxies)
	switch {
	case p.AcceptProxyProtocol && len(p.TrustedProxies) == 0 && f.TrustedProxies == nil:
		v.add(at+".trusted_proxies", "missing: accept_proxy_protocol = true needs the addresses of the balancers allowed to send PROXY headers, e.g. [\"10.0.0.0/24\"]")
	case p.AcceptProxyProtocol && len(p.TrustedProxies) == 0:
		v.add(at+".trusted_proxies", "empty: no client could connect; list the balancers allowed to send PROXY headers")
	case !p.AcceptProxyProtocol && f.TrustedProxies != nil:
		v.add(at+".trusted_proxies", "applies only with accept_proxy_protocol = true")
	}
	if p.AcceptProxyProtocol {
		p.ProxyProtocolTimeout = v.duration(at+".proxy_protocol_timeout", f.ProxyProtocolTimeout, DefaultProxyProtocolTimeout, false)
	} else if f.ProxyProtocolTimeout != nil {
		v.add(at+".proxy_protocol_timeout", "applies only with accept_proxy_protocol = true")
	}
}

// prefixes parses an array of CIDR strings. A bare address is its own
// single-address prefix, as in HAProxy and nginx. Host bits set below the
// mask are refused rather than silently masked: "10.0.0.1/8" is more often
// a typo for "10.0.0.1/32" than a wish for all of 10/8.
func (v *validator) prefixes(key string, raw any) []netip.Prefix {
	if raw == nil {
		return nil
	}
	list, ok := raw.([]any)
	if !ok {
		v.add(key, "want an array of CIDR strings such as [\"10.0.0.0/8\", \"fd00::/8\"], got %s", tomlType(raw))
		return nil
	}
	if len(list) > MaxACLEntries {
		v.add(key, "%d entries, at most %d: use a firewall set for longer lists", len(list), MaxACLEntries)
		return nil
	}
	out := make([]netip.Prefix, 0, len(list))
	for i, item := range list {
		at := fmt.Sprintf("%s[%d]", key, i)
		s, ok := v.str(at, item)
		if !ok {
			continue
		}
		p, err := parsePrefix(s)
		if err != nil {
			v.add(at, "%v", err)
			continue
		}
		out = append(out, p)
	}
	return out
}

func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address or CIDR prefix (e.g. \"10.0.0.0/8\")", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix (e.g. \"10.0.0.0/8\" or \"fd00::/8\")", s)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%q: write IPv4 prefixes in IPv4 form; l4lb matches IPv4 clients of IPv6 sockets as IPv4", s)
	}
	if m := p.Masked(); m != p {
		return netip.Prefix{}, fmt.Errorf("%q has bits set past its mask: write %q for the network, or /%d for one address", s, m.String(), p.Addr().BitLen())
	}
	return p, nil
}
