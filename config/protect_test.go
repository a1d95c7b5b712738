package config

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestProtectDefaultsAndValues(t *testing.T) {
	file := `
[services.plain]
listen = "127.0.0.1:1000"
[[services.plain.backends]]
address = "10.0.0.1:1000"

[services.guarded]
listen = "127.0.0.1:2000"
max_connections = 1000
max_connections_per_source = 10
allow = ["10.0.0.0/8", "fd00::/8", "192.0.2.7", "::ffff:192.0.2.8"]
deny = ["10.6.6.0/24"]
half_close_timeout = "0s"
proxy_protocol = "v2"
accept_proxy_protocol = true
trusted_proxies = ["10.1.0.0/16"]
proxy_protocol_timeout = "2s"
[[services.guarded.backends]]
address = "10.0.0.1:2000"
max_connections = 50
[[services.guarded.backends]]
address = "10.0.0.2:2000"

[services.dns]
listen = "127.0.0.1:53"
protocol = "udp"
proxy_protocol = "v2"
deny = ["192.0.2.0/24"]
[[services.dns.backends]]
address = "10.0.0.1:53"
`
	cfg, err := Parse([]byte(file), "p.toml")
	if err != nil {
		t.Fatal(err)
	}
	plain := cfg.Service("plain").Protect
	if plain.MaxConnections != 0 || plain.MaxConnectionsPerSource != 0 || plain.Allow != nil || plain.Deny != nil ||
		plain.HalfCloseTimeout != DefaultHalfCloseTimeout || plain.ProxyProtocol != ProxyNone || plain.AcceptProxyProtocol ||
		plain.ProxyProtocolTimeout != 0 {
		t.Errorf("defaults: %+v", plain)
	}
	g := cfg.Service("guarded")
	p := netip.MustParsePrefix
	want := Protect{
		MaxConnections: 1000, MaxConnectionsPerSource: 10,
		Allow:            []netip.Prefix{p("10.0.0.0/8"), p("fd00::/8"), p("192.0.2.7/32"), p("192.0.2.8/32")},
		Deny:             []netip.Prefix{p("10.6.6.0/24")},
		HalfCloseTimeout: 0, ProxyProtocol: ProxyV2, AcceptProxyProtocol: true,
		TrustedProxies: []netip.Prefix{p("10.1.0.0/16")}, ProxyProtocolTimeout: 2 * time.Second,
	}
	got := g.Protect
	if got.MaxConnections != want.MaxConnections || got.MaxConnectionsPerSource != want.MaxConnectionsPerSource ||
		!slices.Equal(got.Allow, want.Allow) || !slices.Equal(got.Deny, want.Deny) || got.HalfCloseTimeout != 0 ||
		got.ProxyProtocol != ProxyV2 || !got.AcceptProxyProtocol || !slices.Equal(got.TrustedProxies, want.TrustedProxies) ||
		got.ProxyProtocolTimeout != want.ProxyProtocolTimeout {
		t.Errorf("guarded:\n%+v\nwant\n%+v", got, want)
	}
	if g.Backends[0].MaxConnections != 50 || g.Backends[1].MaxConnections != 0 {
		t.Errorf("backend max_connections: %+v", g.Backends)
	}
	dns := cfg.Service("dns").Protect
	if dns.ProxyProtocol != ProxyV2 || len(dns.Deny) != 1 || dns.HalfCloseTimeout != 0 {
		t.Errorf("udp: %+v", dns)
	}
}

// FuzzParse feeds arbitrary bytes to the parser and validator: whatever
// the input, Parse returns a config or an *Errors, never panics, and a
// config it returns is complete.
func FuzzParse(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*.toml")
	for _, path := range seeds {
		if b, err := os.ReadFile(path); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(full))
	f.Add([]byte("[services.a]\nlisten = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/8\"]\nproxy_protocol = \"v1\"\n[[services.a.backends]]\naddress = \"10.0.0.1:1\"\nmax_connections = 3\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data, "fuzz.toml")
		if err != nil {
			var errs *Errors
			if !errors.As(err, &errs) || len(errs.Problems) == 0 {
				t.Fatalf("error %T %v: want *Errors with problems", err, err)
			}
			_ = errs.Error()
			return
		}
		if len(cfg.Services) == 0 {
			t.Fatal("accepted a config without services")
		}
		for _, s := range cfg.Services {
			if len(s.Backends) == 0 || !s.Listen.IsValid() || s.Workers < 1 || s.ConnectTimeout <= 0 {
				t.Fatalf("accepted an incomplete service %+v", s)
			}
			if s.AcceptProxyProtocol && len(s.TrustedProxies) == 0 {
				t.Fatalf("accept_proxy_protocol without trusted proxies: %+v", s)
			}
			for _, p := range append(append(slices.Clone(s.Allow), s.Deny...), s.TrustedProxies...) {
				if p != p.Masked() || p.Addr().Is4In6() {
					t.Fatalf("non-canonical prefix %v", p)
				}
			}
		}
	})
}
