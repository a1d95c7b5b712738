package config

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
)

const full = `
[admin]
listen = "127.0.0.1:9901"

[services.pg]
listen = "0.0.0.0:5432"
protocol = "tcp"
balance = "maglev"
hash_key = "source_ip_port"
workers = 3
connect_timeout = "2s"
idle_timeout = "10m"
drain_timeout = "5s"

  [[services.pg.backends]]
  address = "10.0.0.11:5432"
  weight = 50

  [[services.pg.backends]]
  address = "[fd00::12]:5432"

[services.cache]
listen = "[::1]:6379"
balance = "least_conn"

  [[services.cache.backends]]
  address = "[::ffff:10.0.0.21]:6379"
  weight = 0
`

func TestParseFull(t *testing.T) {
	cfg, err := Parse([]byte(full), "full.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != "127.0.0.1:9901" {
		t.Errorf("admin.listen = %q", cfg.Admin.Listen)
	}
	if len(cfg.Services) != 2 || cfg.Services[0].Name != "cache" || cfg.Services[1].Name != "pg" {
		t.Fatalf("services not sorted by name: %+v", cfg.Services)
	}
	pg := cfg.Service("pg")
	want := Service{
		Name: "pg", Listen: netip.MustParseAddrPort("0.0.0.0:5432"), Protocol: TCP, Balance: Maglev,
		HashKey: SourceIPPort, Workers: 3, ConnectTimeout: 2 * time.Second, IdleTimeout: 10 * time.Minute,
		DrainTimeout: 5 * time.Second,
		Backends: []Backend{
			{Address: netip.MustParseAddrPort("10.0.0.11:5432"), Weight: 50},
			{Address: netip.MustParseAddrPort("[fd00::12]:5432"), Weight: DefaultWeight},
		},
	}
	if got := *pg; !equalService(got, want) {
		t.Errorf("pg =\n%+v\nwant\n%+v", got, want)
	}
	cache := cfg.Service("cache")
	if cache.Workers != runtime.GOMAXPROCS(0) {
		t.Errorf("workers = 0 should resolve to GOMAXPROCS, got %d", cache.Workers)
	}
	if cache.ConnectTimeout != DefaultConnectTimeout || cache.IdleTimeout != DefaultIdleTimeout || cache.DrainTimeout != DefaultDrainTimeout {
		t.Errorf("default timeouts not applied: %+v", cache)
	}
	if got := cache.Backends[0].Address.Addr(); got != netip.MustParseAddr("10.0.0.21") {
		t.Errorf("IPv4-mapped backend not unmapped: %v", got)
	}
	if cache.Backends[0].Weight != 0 {
		t.Errorf("explicit weight 0 lost: %d", cache.Backends[0].Weight)
	}
	if cfg.Hash == "" || cfg.Path != "full.toml" {
		t.Errorf("hash/path not set: %q %q", cfg.Hash, cfg.Path)
	}
	again, _ := Parse([]byte(full), "other.toml")
	if again.Hash != cfg.Hash {
		t.Error("same bytes must hash the same")
	}
}

// TestUDPDefaults checks the defaults that differ by protocol: a UDP
// service idles out after a minute and caps its flows, a TCP one has no cap.
func TestUDPDefaults(t *testing.T) {
	file := `
[services.dns]
listen = "127.0.0.1:53"
protocol = "udp"
[[services.dns.backends]]
address = "10.0.0.1:53"

[services.game]
listen = "127.0.0.1:7777"
protocol = "udp"
idle_timeout = "5s"
max_flows = 100
replies_per_datagram = 1
[[services.game.backends]]
address = "10.0.0.1:7777"

[services.dnstcp]
listen = "127.0.0.1:53"
[[services.dnstcp.backends]]
address = "10.0.0.1:53"
`
	cfg, err := Parse([]byte(file), "udp.toml")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		protocol Protocol
		idle     time.Duration
		maxFlows int
		replies  int
	}{
		{"dns", UDP, DefaultUDPIdleTimeout, DefaultMaxFlows, 0},
		{"game", UDP, 5 * time.Second, 100, 1},
		{"dnstcp", TCP, DefaultIdleTimeout, 0, 0},
	}
	for _, tt := range tests {
		s := cfg.Service(tt.name)
		if s.Protocol != tt.protocol || s.IdleTimeout != tt.idle || s.MaxFlows != tt.maxFlows || s.RepliesPerDatagram != tt.replies {
			t.Errorf("%s: protocol %s, idle_timeout %v, max_flows %d, replies_per_datagram %d; want %s, %v, %d, %d",
				tt.name, s.Protocol, s.IdleTimeout, s.MaxFlows, s.RepliesPerDatagram, tt.protocol, tt.idle, tt.maxFlows, tt.replies)
		}
	}
}

func TestAdminDefaultsAndDisable(t *testing.T) {
	base := "[services.a]\nlisten = \"127.0.0.1:1000\"\n[[services.a.backends]]\naddress = \"127.0.0.1:2000\"\n"
	cfg, err := Parse([]byte(base), "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != DefaultAdminListen {
		t.Errorf("default admin.listen = %q", cfg.Admin.Listen)
	}
	cfg, err = Parse([]byte("[admin]\nlisten = \"\"\n"+base), "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != "" {
		t.Errorf("empty admin.listen should disable, got %q", cfg.Admin.Listen)
	}
}

func TestParseErrors(t *testing.T) {
	svc := func(body string) string {
		return "[services.pg]\nlisten = \"127.0.0.1:5432\"\n" + body + "\n[[services.pg.backends]]\naddress = \"10.0.0.1:5432\"\n"
	}
	tests := []struct {
		name string
		file string
		want []string // each must appear in the error text
	}{
		{"syntax", "[services.pg\nlisten = 1", []string{"bad.toml:1:"}},
		{"truncated", "[services.pg]\nlisten = \"127.0.0.1:5", []string{"bad.toml:2:"}},
		{"unknown top key", "colour = 1\n" + svc(""), []string{"colour: unknown key"}},
		{"unknown service key", svc("wieght = 3"), []string{"services.pg.wieght: unknown key"}},
		{"unknown backend key", svc("") + "wieght = 3\n", []string{"services.pg.backends[0].wieght: unknown key"}},
		{"wrong type", svc("workers = \"four\""), []string{"services.pg.workers: want an integer, got a string"}},
		{"bad duration", svc("idle_timeout = \"10 minutes\""), []string{"services.pg.idle_timeout:", "not a duration"}},
		{"duration as number", svc("connect_timeout = 3"), []string{"services.pg.connect_timeout: want a duration string"}},
		{"zero timeout", svc("connect_timeout = \"0s\""), []string{"services.pg.connect_timeout: 0s must be greater than zero"}},
		{"bad protocol", svc("protocol = \"sctp\""), []string{"services.pg.protocol: \"sctp\" is not one of tcp, udp"}},
		{"max_flows on tcp", svc("max_flows = 10"), []string{"services.pg.max_flows: applies only to protocol = \"udp\""}},
		{"max_flows range", svc("protocol = \"udp\"\nmax_flows = 0"), []string{"services.pg.max_flows: 0 is out of range [1, 16777216]"}},
		{"max_flows type", svc("protocol = \"udp\"\nmax_flows = \"many\""), []string{"services.pg.max_flows: want an integer, got a string"}},
		{"replies_per_datagram on tcp", svc("replies_per_datagram = 1"), []string{"services.pg.replies_per_datagram: applies only to protocol = \"udp\""}},
		{"replies_per_datagram range", svc("protocol = \"udp\"\nreplies_per_datagram = 0"), []string{"services.pg.replies_per_datagram: 0 is out of range [1, 1000]"}},
		{"bad enum", svc("balance = \"random\""), []string{"services.pg.balance: \"random\" is not one of maglev, round_robin, least_conn"}},
		{"hash_key without maglev", svc("balance = \"round_robin\"\nhash_key = \"source_ip\""), []string{"services.pg.hash_key: applies only to balance = \"maglev\""}},
		{"workers range", svc("workers = -1"), []string{"services.pg.workers: -1 is out of range [0, 1024]"}},
		{"port range", "[services.pg]\nlisten = \"127.0.0.1:70000\"\n[[services.pg.backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"services.pg.listen:", "out of range"}},
		{"port zero", svc("") + "[[services.pg.backends]]\naddress = \"10.0.0.2:0\"\n", []string{"services.pg.backends[1].address:", "port 0"}},
		{"hostname", svc("") + "[[services.pg.backends]]\naddress = \"db.local:5432\"\n", []string{"services.pg.backends[1].address:", "not an IP address"}},
		{"ipv4 octet too big", svc("") + "[[services.pg.backends]]\naddress = \"10.0.0.300:5432\"\n", []string{"services.pg.backends[1].address:", "not a valid IPv4 address: IPv4 field has value >255"}},
		{"ipv4 leading zero", svc("") + "[[services.pg.backends]]\naddress = \"127.0.0.01:5432\"\n", []string{"not a valid IPv4 address", "leading zero"}},
		{"address with spaces", svc("") + "[[services.pg.backends]]\naddress = \" 10.0.0.4:5432\"\n", []string{"services.pg.backends[1].address:", "remove the spaces"}},
		{"negative drain", svc("drain_timeout = \"-5s\""), []string{"services.pg.drain_timeout: -5s must not be negative"}},
		{"backend unspecified", svc("") + "[[services.pg.backends]]\naddress = \"0.0.0.0:5432\"\n", []string{"services.pg.backends[1].address: 0.0.0.0:5432 is the unspecified address"}},
		{"backend ipv6 unspecified", svc("") + "[[services.pg.backends]]\naddress = \"[::]:5432\"\n", []string{"services.pg.backends[1].address: [::]:5432 is the unspecified address"}},
		{"backend multicast", svc("") + "[[services.pg.backends]]\naddress = \"239.1.2.3:5432\"\n", []string{"services.pg.backends[1].address: 239.1.2.3:5432 is a multicast address"}},
		{"backend ipv6 multicast", svc("") + "[[services.pg.backends]]\naddress = \"[ff02::1]:5432\"\n", []string{"services.pg.backends[1].address: [ff02::1]:5432 is a multicast address"}},
		{"backend broadcast", svc("") + "[[services.pg.backends]]\naddress = \"255.255.255.255:5432\"\n", []string{"services.pg.backends[1].address: 255.255.255.255:5432 is the broadcast address"}},
		{"ipv6 without brackets", svc("") + "[[services.pg.backends]]\naddress = \"fd00::1:5432\"\n", []string{"brackets"}},
		{"missing listen", "[services.pg]\n[[services.pg.backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"services.pg.listen: missing"}},
		{"listen without ip", "[services.pg]\nlisten = \":5432\"\n[[services.pg.backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"services.pg.listen:", "missing IP"}},
		{"no backends", "[services.pg]\nlisten = \"127.0.0.1:5432\"\n", []string{"services.pg.backends: no backends"}},
		{"no services", "[admin]\nlisten = \"127.0.0.1:9901\"\n", []string{"services: no services defined"}},
		{"services not a table", "services = \"pg\"\n", []string{"services: want [services.NAME] tables, got a string"}},
		{"duplicate backend", svc("") + "[[services.pg.backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"services.pg.backends[1].address: duplicate backend 10.0.0.1:5432 (also services.pg.backends[0])"}},
		{"weight range", svc("") + "weight = 1001\n", []string{"services.pg.backends[0].weight: 1001 is out of range [0, 1000]"}},
		{"negative weight", svc("") + "weight = -1\n", []string{"services.pg.backends[0].weight: -1 is out of range"}},
		{"backup not a bool", svc("") + "[[services.pg.backends]]\naddress = \"10.0.0.2:5432\"\nbackup = \"yes\"\n",
			[]string{"services.pg.backends[1].backup: want true or false, got a string"}},
		{"backup as number", svc("") + "[[services.pg.backends]]\naddress = \"10.0.0.2:5432\"\nbackup = 1\n",
			[]string{"services.pg.backends[1].backup: want true or false, got an integer"}},
		{"every backend a backup", svc("") + "backup = true\n[[services.pg.backends]]\naddress = \"10.0.0.2:5432\"\nbackup = true\n",
			[]string{"services.pg.backends: every backend has backup = true", "at least one backend must be a primary"}},
		{"same listen", svc("") + "[services.pg2]\nlisten = \"127.0.0.1:5432\"\n[[services.pg2.backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"services.pg2.listen: 127.0.0.1:5432 overlaps services.pg.listen"}},
		{"backend is the listen address", svc("") + "[[services.pg.backends]]\naddress = \"127.0.0.1:5432\"\n", []string{"services.pg.backends[1].address: 127.0.0.1:5432 is the service's own listen address"}},
		{"admin on a service", "[admin]\nlisten = \"127.0.0.1:5432\"\n" + svc(""), []string{"admin.listen: 127.0.0.1:5432 overlaps services.pg.listen"}},
		{"default admin on a service", "[services.admin_port]\nlisten = \"127.0.0.1:9901\"\n[[services.admin_port.backends]]\naddress = \"10.0.0.1:9901\"\n",
			[]string{`admin.listen: the default admin endpoint 127.0.0.1:9901 overlaps services.admin_port.listen (127.0.0.1:9901): set [admin] listen to another address, or to "" for none`}},
		{"udp backend is its own listen", "[services.dns]\nlisten = \"127.0.0.1:5353\"\nprotocol = \"udp\"\n[services.dns.health]\nkind = \"none\"\n[[services.dns.backends]]\naddress = \"127.0.0.1:5353\"\n",
			[]string{"services.dns.backends[0].address: 127.0.0.1:5353 is the service's own listen address"}},
		{"wildcard overlap", svc("") + "[services.pg2]\nlisten = \"0.0.0.0:5432\"\n[[services.pg2.backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"services.pg2.listen:", "overlaps"}},
		{"bad admin", "[admin]\nlisten = \"localhost\"\n" + svc(""), []string{"admin.listen:"}},
		{"bad service name", "[services.\"p g\"]\nlisten = \"127.0.0.1:5432\"\n[[services.\"p g\".backends]]\naddress = \"10.0.0.1:5432\"\n", []string{"service name must be"}},
		// Health checks (health.go).
		{"health unknown key", svc("") + "[services.pg.health]\nintervall = \"1s\"\n", []string{"services.pg.health.intervall: unknown key"}},
		{"health bad kind", svc("") + "[services.pg.health]\nkind = \"http\"\n", []string{"services.pg.health.kind: \"http\" is not one of none, tcp, send_expect"}},
		{"health bad interval", svc("") + "[services.pg.health]\ninterval = \"2 s\"\n", []string{"services.pg.health.interval:", "not a duration"}},
		{"health interval too short", svc("") + "[services.pg.health]\ninterval = \"1us\"\n", []string{"services.pg.health.interval: 1µs is too short"}},
		{"health timeout over interval", svc("") + "[services.pg.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n", []string{"services.pg.health.timeout: 2s is longer than interval (1s)"}},
		{"health rise range", svc("") + "[services.pg.health]\nrise = 0\n", []string{"services.pg.health.rise: 0 is out of range [1, 100]"}},
		{"health fall type", svc("") + "[services.pg.health]\nfall = \"3\"\n", []string{"services.pg.health.fall: want an integer, got a string"}},
		{"health port range", svc("") + "[services.pg.health]\nport = 65536\n", []string{"services.pg.health.port: 65536 is out of range [0, 65535]"}},
		{"health send with tcp", svc("") + "[services.pg.health]\nkind = \"tcp\"\nsend = \"PING\"\n", []string{"services.pg.health.send: applies only to kind = \"send_expect\""}},
		{"health interval with none", svc("") + "[services.pg.health]\nkind = \"none\"\ninterval = \"1s\"\n", []string{"services.pg.health.interval: applies only to kind = \"tcp\" or \"send_expect\""}},
		{"health send_expect without expect", svc("") + "[services.pg.health]\nkind = \"send_expect\"\nsend = \"PING\\r\\n\"\n", []string{"services.pg.health.expect: missing"}},
		{"health expect and regex", svc("") + "[services.pg.health]\nkind = \"send_expect\"\nexpect = \"+PONG\"\nexpect_regex = \"PONG\"\n", []string{"services.pg.health.expect_regex: set expect or expect_regex, not both"}},
		{"health bad regex", svc("") + "[services.pg.health]\nkind = \"send_expect\"\nexpect_regex = \"(\"\n", []string{"services.pg.health.expect_regex: error parsing regexp"}},
		{"health empty expect", svc("") + "[services.pg.health]\nkind = \"send_expect\"\nexpect = \"\"\n", []string{"services.pg.health.expect: must not be empty"}},
		{"udp health without kind", svc("protocol = \"udp\"") + "[services.pg.health]\n", []string{"services.pg.health.kind: a UDP service has no default check kind"}},
		{"udp send_expect without send", svc("protocol = \"udp\"") + "[services.pg.health]\nkind = \"send_expect\"\nexpect = \"pong\"\n",
			[]string{"services.pg.health.send: missing: a UDP send_expect check must send a request"}},
		{"udp send_expect with empty send", svc("protocol = \"udp\"") + "[services.pg.health]\nkind = \"send_expect\"\nsend = \"\"\nexpect = \"pong\"\n",
			[]string{"services.pg.health.send: must not be empty for a UDP service"}},
		{"passive_fall on udp", svc("protocol = \"udp\"\npassive_fall = 3") + "[services.pg.health]\nkind = \"send_expect\"\nsend = \"ping\"\nexpect = \"pong\"\n",
			[]string{"services.pg.passive_fall: applies only to protocol = \"tcp\" (protocol is \"udp\"): it counts failed connects"}},
		{"passive_fall without checks", svc("passive_fall = 2"), []string{"services.pg.passive_fall: needs an active health check"}},
		{"passive_fall range", svc("passive_fall = -1") + "[services.pg.health]\n", []string{"services.pg.passive_fall: -1 is out of range [0, 100]"}},
		{"bad panic_mode", svc("panic_mode = \"some\""), []string{"services.pg.panic_mode: \"some\" is not one of none, all"}},
		{"bad on_down", svc("on_down = \"drain\""), []string{"services.pg.on_down: \"drain\" is not one of keep, close"}},
		{"bad on_failback", svc("on_failback = \"shutdown-backup-sessions\""), []string{"services.pg.on_failback: \"shutdown-backup-sessions\" is not one of keep, close"}},
		{"on_failback type", svc("on_failback = true"), []string{"services.pg.on_failback: want a string, got a boolean"}},
		// Protection (protect.go).
		{"max_connections range", svc("max_connections = -1"), []string{"services.pg.max_connections: -1 is out of range [0, 16777216]"}},
		{"max_connections type", svc("max_connections = \"100\""), []string{"services.pg.max_connections: want an integer, got a string"}},
		{"max_connections on udp", svc("protocol = \"udp\"\nmax_connections = 10"), []string{"services.pg.max_connections: applies only to protocol = \"tcp\"", "max_flows"}},
		{"per source on udp", svc("protocol = \"udp\"\nmax_connections_per_source = 10"), []string{"services.pg.max_connections_per_source: applies only to protocol = \"tcp\""}},
		{"per source range", svc("max_connections_per_source = 16777217"), []string{"services.pg.max_connections_per_source: 16777217 is out of range"}},
		{"backend max_connections range", svc("") + "max_connections = -5\n", []string{"services.pg.backends[0].max_connections: -5 is out of range"}},
		{"backend max_connections on udp", svc("protocol = \"udp\"") + "max_connections = 5\n", []string{"services.pg.backends[0].max_connections: applies only to protocol = \"tcp\""}},
		{"allow not array", svc("allow = \"10.0.0.0/8\""), []string{"services.pg.allow: want an array of CIDR strings"}},
		{"allow bad cidr", svc("allow = [\"10.0.0.0/8\", \"10.0.0.0/33\"]"), []string{"services.pg.allow[1]: \"10.0.0.0/33\" is not a CIDR prefix"}},
		{"deny host bits", svc("deny = [\"10.1.2.3/8\"]"), []string{"services.pg.deny[0]: \"10.1.2.3/8\" has bits set past its mask: write \"10.0.0.0/8\""}},
		{"deny hostname", svc("deny = [\"evil.example\"]"), []string{"services.pg.deny[0]: \"evil.example\" is not an IP address or CIDR prefix"}},
		{"deny number", svc("deny = [10]"), []string{"services.pg.deny[0]: want a string, got an integer"}},
		{"deny mapped", svc("deny = [\"::ffff:10.0.0.0/104\"]"), []string{"services.pg.deny[0]:", "IPv4 form"}},
		{"half_close_timeout bad", svc("half_close_timeout = \"soon\""), []string{"services.pg.half_close_timeout:", "not a duration"}},
		{"half_close_timeout on udp", svc("protocol = \"udp\"\nhalf_close_timeout = \"1s\""), []string{"services.pg.half_close_timeout: applies only to protocol = \"tcp\""}},
		{"proxy_protocol bad", svc("proxy_protocol = \"v3\""), []string{"services.pg.proxy_protocol: \"v3\" is not one of none, v1, v2"}},
		{"proxy_protocol v1 on udp", svc("protocol = \"udp\"\nproxy_protocol = \"v1\""), []string{"services.pg.proxy_protocol: \"v1\" is for TCP only"}},
		{"accept without trusted", svc("accept_proxy_protocol = true"), []string{"services.pg.trusted_proxies: missing"}},
		{"accept with empty trusted", svc("accept_proxy_protocol = true\ntrusted_proxies = []"), []string{"services.pg.trusted_proxies: empty"}},
		{"trusted without accept", svc("trusted_proxies = [\"10.0.0.0/8\"]"), []string{"services.pg.trusted_proxies: applies only with accept_proxy_protocol = true"}},
		{"accept type", svc("accept_proxy_protocol = \"yes\""), []string{"services.pg.accept_proxy_protocol: want true or false, got a string"}},
		{"accept on udp", svc("protocol = \"udp\"\naccept_proxy_protocol = true\ntrusted_proxies = [\"10.0.0.1\"]"), []string{"services.pg.accept_proxy_protocol: applies only to protocol = \"tcp\""}},
		{"proxy timeout without accept", svc("proxy_protocol_timeout = \"1s\""), []string{"services.pg.proxy_protocol_timeout: applies only with accept_proxy_protocol = true"}},
		{"proxy timeout zero", svc("accept_proxy_protocol = true\ntrusted_proxies = [\"10.0.0.1\"]\nproxy_protocol_timeout = \"0s\""), []string{"services.pg.proxy_protocol_timeout: 0s must be greater than zero"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.file), "bad.toml")
			if err == nil {
				t.Fatalf("accepted:\n%s", tt.file)
			}
			var errs *Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error is %T, want *Errors", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n%s\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

// TestListenOverlap checks which pairs of listen addresses on one port
// are refused as overlapping: 0.0.0.0 takes IPv4 clients only, [::] both
// families.
func TestListenOverlap(t *testing.T) {
	tests := []struct {
		a, b    string
		overlap bool
	}{
		{"127.0.0.1", "127.0.0.1", true},
		{"127.0.0.1", "127.0.0.2", false},
		{"0.0.0.0", "10.0.0.1", true},
		{"0.0.0.0", "[::1]", false},
		{"0.0.0.0", "[fd00::1]", false},
		{"0.0.0.0", "[::]", true},
		{"[::]", "10.0.0.1", true},
		{"[::]", "[fd00::1]", true},
		{"[fd00::1]", "[fd00::2]", false},
	}
	for _, tt := range tests {
		for _, pair := range [][2]string{{tt.a, tt.b}, {tt.b, tt.a}} {
			file := fmt.Sprintf("[services.a]\nlisten = \"%s:5432\"\n[[services.a.backends]]\naddress = \"10.9.0.1:5432\"\n"+
				"[services.b]\nlisten = \"%s:5432\"\n[[services.b.backends]]\naddress = \"10.9.0.1:5432\"\n", pair[0], pair[1])
			_, err := Parse([]byte(file), "overlap.toml")
			if got := err != nil && strings.Contains(err.Error(), "overlaps"); got != tt.overlap || (err != nil && !got) {
				t.Errorf("%s:5432 and %s:5432: overlap %v, want %v (error: %v)", pair[0], pair[1], got, tt.overlap, err)
			}
			// The admin endpoint binds as a service does.
			file = fmt.Sprintf("[admin]\nlisten = \"%s:5432\"\n[services.b]\nlisten = \"%s:5432\"\n[[services.b.backends]]\naddress = \"10.9.0.1:5432\"\n", pair[0], pair[1])
			_, err = Parse([]byte(file), "overlap.toml")
			if got := err != nil && strings.Contains(err.Error(), "admin.listen") && strings.Contains(err.Error(), "overlaps"); got != tt.overlap || (err != nil && !got) {
				t.Errorf("admin %s:5432 and service %s:5432: overlap %v, want %v (error: %v)", pair[0], pair[1], got, tt.overlap, err)
			}
		}
	}
}

// TestWildcardServiceBackendOnLoopback checks that a TCP service on a
// wildcard refuses a backend on a loopback address it listens on itself,
// and only that: 0.0.0.0 does not listen on [::1].
func TestWildcardServiceBackendOnLoopback(t *testing.T) {
	tests := []struct {
		listen, backend string
		refused         bool
	}{
		{"0.0.0.0", "127.0.0.1", true},
		{"0.0.0.0", "[::1]", false},
		{"[::]", "127.0.0.1", true},
		{"[::]", "[::1]", true},
	}
	for _, tt := range tests {
		file := fmt.Sprintf("[services.a]\nlisten = \"%s:5432\"\n[[services.a.backends]]\naddress = \"%s:5432\"\n", tt.listen, tt.backend)
		_, err := Parse([]byte(file), "self.toml")
		if got := err != nil && strings.Contains(err.Error(), "own listen address"); got != tt.refused || (err != nil && !got) {
			t.Errorf("listen %s:5432, backend %s:5432: refused %v, want %v (error: %v)", tt.listen, tt.backend, got, tt.refused, err)
		}
	}
}

func TestParseReportsEveryProblem(t *testing.T) {
	file := `
[services.pg]
listen = "127.0.0.1:99999"
workers = "x"
idle_timeout = "forever"
colour = "blue"

  [[services.pg.backends]]
  address = "10.0.0.1"
  weight = 5000

  [[services.pg.backends]]
  address = "10.0.0.2:5432"
  [[services.pg.backends]]
  address = "10.0.0.2:5432"

[services.empty]
listen = "127.0.0.1:1"

# Valid itself, on the address of the invalid service above: the overlap
# is reported along with that service's own problem.
[services.dup]
listen = "127.0.0.1:1"
  [[services.dup.backends]]
  address = "10.0.0.3:1"
`
	_, err := Parse([]byte(file), "many.toml")
	var errs *Errors
	if !errors.As(err, &errs) {
		t.Fatalf("want *Errors, got %v", err)
	}
	keys := map[string]bool{}
	for _, p := range errs.Problems {
		keys[p.Key] = true
	}
	for _, k := range []string{
		"services.pg.listen", "services.pg.workers", "services.pg.idle_timeout", "services.pg.colour",
		"services.pg.backends[0].address", "services.pg.backends[0].weight", "services.pg.backends[2].address",
		"services.empty.backends", "services.empty.listen",
	} {
		if !keys[k] {
			t.Errorf("no problem reported for %s; got:\n%v", k, err)
		}
	}
	for _, line := range strings.Split(err.Error(), "\n") {
		if !strings.HasPrefix(line, "many.toml: services.") {
			t.Errorf("line does not name file and key: %q", line)
		}
	}
}

// A scalar where a table belongs is a problem under its dotted key, like
// any other value of the wrong type: it neither aborts validation (hiding
// the file's other problems) nor is reported at line 1, column 1.
func TestParseScalarWhereTableBelongs(t *testing.T) {
	const backend = "[[services.pg.backends]]\naddress = \"10.0.0.1:5432\"\n"
	for _, tt := range []struct {
		name, file, key string
	}{
		{"admin", "admin = \"127.0.0.1:9901\"\n[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\n" + backend, "admin"},
		{"log", "log = \"debug\"\n[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\n" + backend, "log"},
		{"process", "process = 1\n[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\n" + backend, "process"},
		{"reload", "reload = true\n[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\n" + backend, "reload"},
		{"health", "[services.pg]\nlisten = \"127.0.0.1:5432\"\nhealth = \"tcp\"\nwieght = 3\n" + backend, "services.pg.health"},
		{"service", "[services]\ncache = \"127.0.0.1:6379\"\n[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\n" + backend, "services.cache"},
		{"backends", "[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\nbackends = \"10.0.0.1:5432\"\n", "services.pg.backends"},
		{"backend", "[services.pg]\nlisten = \"127.0.0.1:5432\"\nwieght = 3\nbackends = [{ address = \"10.0.0.1:5432\" }, 7]\n", "services.pg.backends[1]"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.file), "types.toml")
			var errs *Errors
			if !errors.As(err, &errs) {
				t.Fatalf("want *Errors, got %v", err)
			}
			keys := map[string]string{}
			for _, p := range errs.Problems {
				keys[p.Key] = p.Message
			}
			if msg := keys[tt.key]; !strings.HasPrefix(msg, "want a") {
				t.Errorf("no type problem under %s; got:\n%v", tt.key, err)
			}
			if keys["services.pg.wieght"] != "unknown key" || len(errs.Problems) != 2 {
				t.Errorf("want exactly the type problem and services.pg.wieght; got:\n%v", err)
			}
		})
	}
}

// backends = ["10.0.0.1:5432"], as HAProxy's and nginx's server lists
// read, is told that backends are tables, not that an address is missing.
func TestParseBackendsAsAddresses(t *testing.T) {
	_, err := Parse([]byte("[services.pg]\nlisten = \"127.0.0.1:5432\"\nbackends = [\"10.0.0.1:5432\", \"10.0.0.2:5432\"]\n"), "pg.toml")
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.Problems) != 2 {
		t.Fatalf("want one problem per backend, got:\n%v", err)
	}
	for i, p := range errs.Problems {
		if want := fmt.Sprintf("services.pg.backends[%d]", i); p.Key != want || !strings.Contains(p.Message, "backends are tables") ||
			!strings.Contains(p.Message, "[[services.pg.backends]]") {
			t.Errorf("problem %d: %s; want it under %s, saying backends are tables", i, p, want)
		}
	}
}

func TestSyntaxErrorPosition(t *testing.T) {
	_, err := Parse([]byte("[admin]\nlisten = \"127.0.0.1:9901\"\n\n[services.pg\n"), "s.toml")
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.Problems) != 1 {
		t.Fatalf("want one problem, got %v", err)
	}
	p := errs.Problems[0]
	if p.Line != 4 || p.Col < 1 || p.Context == "" {
		t.Errorf("want line 4 with a column and context, got %+v", p)
	}
	if !strings.HasPrefix(err.Error(), "s.toml:4:") {
		t.Errorf("want s.toml:4:COL: prefix, got %q", err)
	}
}

func equalService(a, b Service) bool {
	if len(a.Backends) != len(b.Backends) {
		return false
	}
	for i := range a.Backends {
		if a.Backends[i] != b.Backends[i] {
			return false
		}
	}
	a.Backends, b.Backends = nil, nil
	return a.Name == b.Name && a.Listen == b.Listen && a.Protocol == b.Protocol && a.Balance == b.Balance &&
		a.HashKey == b.HashKey && a.Workers == b.Workers && a.ConnectTimeout == b.ConnectTimeout &&
		a.IdleTimeout == b.IdleTimeout && a.DrainTimeout == b.DrainTimeout
}

// A protocol that does not parse reads as the default (tcp) for the rest of
// the checks: it must not add an overlap with a TCP service on the same
// port, which the intended UDP service would not have.
func TestBadProtocolAddsNoOverlap(t *testing.T) {
	file := "[services.dns_tcp]\nlisten = \"0.0.0.0:53\"\n[[services.dns_tcp.backends]]\naddress = \"10.0.0.1:53\"\n" +
		"[services.dns_udp]\nlisten = \"0.0.0.0:53\"\nprotocol = \"UDP\"\n[[services.dns_udp.backends]]\naddress = \"10.0.0.1:53\"\n"
	_, err := Parse([]byte(file), "dns.toml")
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.Problems) != 1 || errs.Problems[0].Key != "services.dns_udp.protocol" {
		t.Fatalf("want only the protocol problem, got:\n%v", err)
	}
}

// backup = true marks a standby, as HAProxy's and nginx's `backup`; it
// defaults to false, and is kept per backend with the other settings.
func TestParseBackup(t *testing.T) {
	const file = `
[services.pg]
listen = "127.0.0.1:5432"
  [[services.pg.backends]]
  address = "10.0.0.1:5432"
  [[services.pg.backends]]
  address = "10.0.0.2:5432"
  backup = false
  [[services.pg.backends]]
  address = "10.0.0.3:5432"
  weight = 20
  backup = true

[services.dns]
listen = "127.0.0.1:53"
protocol = "udp"
backends = [{ address = "10.0.0.1:53" }, { address = "10.0.0.2:53", backup = true }]
`
	cfg, err := Parse([]byte(file), "backup.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		service string
		want    []bool
	}{
		{"pg", []bool{false, false, true}},
		{"dns", []bool{false, true}},
	} {
		svc := cfg.Service(tt.service)
		for i, b := range svc.Backends {
			if b.Backup != tt.want[i] {
				t.Errorf("%s backend %d (%s): backup %v, want %v", tt.service, i, b.Address, b.Backup, tt.want[i])
			}
		}
	}
	if b := cfg.Service("pg").Backends[2]; b.Weight != 20 {
		t.Errorf("backup's weight %d, want 20", b.Weight)
	}
}

// The backup and on_failback problems are reported with the file's other
// problems, each under its own key, in one run.
func TestParseBackupProblemsWithOthers(t *testing.T) {
	const file = `
[services.pg]
listen = "127.0.0.1:5432"
on_failback = "drain"
  [[services.pg.backends]]
  address = "10.0.0.1:5432"
  backup = true
  [[services.pg.backends]]
  address = "10.0.0.2:5432"
  backup = true
  weight = 2000

[services.web]
listen = "127.0.0.1:80"
  [[services.web.backends]]
  address = "10.0.0.1:80"
  backup = "no"
`
	_, err := Parse([]byte(file), "backup.toml")
	var errs *Errors
	if !errors.As(err, &errs) {
		t.Fatalf("want *Errors, got %v", err)
	}
	keys := map[string]bool{}
	for _, p := range errs.Problems {
		keys[p.Key] = true
	}
	for _, k := range []string{"services.pg.backends", "services.pg.backends[1].weight", "services.pg.on_failback", "services.web.backends[0].backup"} {
		if !keys[k] {
			t.Errorf("no problem under %s; got:\n%v", k, err)
		}
	}
	if len(errs.Problems) != 4 {
		t.Errorf("want 4 problems, got:\n%v", err)
	}
}
