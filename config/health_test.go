package config

import (
	"testing"
	"time"
)

func TestParseHealth(t *testing.T) {
	const file = `
[services.none]
listen = "127.0.0.1:1000"
[[services.none.backends]]
address = "10.0.0.1:1000"

[services.tcp]
listen = "127.0.0.1:1001"
on_down = "close"
on_failback = "close"
panic_mode = "all"
[services.tcp.health]
[[services.tcp.backends]]
address = "10.0.0.1:1001"

[services.redis]
listen = "127.0.0.1:6379"
passive_fall = 0
[services.redis.health]
kind = "send_expect"
interval = "500ms"
rise = 1
fall = 5
send = "PING\r\n"
expect = "+PONG"
port = 6380
[[services.redis.backends]]
address = "10.0.0.1:6379"

[services.ssh]
listen = "127.0.0.1:22"
[services.ssh.health]
kind = "send_expect"
expect_regex = '^SSH-2\.0-'
[[services.ssh.backends]]
address = "10.0.0.1:22"

[services.dns]
listen = "127.0.0.1:53"
protocol = "udp"
[services.dns.health]
kind = "send_expect"
send = "ping"
expect = "pong"
[[services.dns.backends]]
address = "10.0.0.1:53"
`
	cfg, err := Parse([]byte(file), "health.toml")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		service     string
		health      Health
		passiveFall int
		panicMode   PanicMode
		onDown      OnDown
		onFailback  OnFailback
	}{
		// No [health] table: no probes, and so no passive detection.
		{"none", Health{Kind: HealthNone}, 0, PanicNone, OnDownKeep, OnFailbackKeep},
		// An empty [health] table: a TCP connect with every default.
		{"tcp", Health{Kind: HealthTCP, Interval: DefaultHealthInterval, Timeout: DefaultHealthTimeout, Rise: DefaultHealthRise, Fall: DefaultHealthFall},
			DefaultPassiveFall, PanicAll, OnDownClose, OnFailbackClose},
		// The timeout defaults to the interval when that is shorter.
		{"redis", Health{Kind: HealthSendExpect, Interval: 500 * time.Millisecond, Timeout: 500 * time.Millisecond, Rise: 1, Fall: 5,
			Send: "PING\r\n", Expect: "+PONG", Port: 6380}, 0, PanicNone, OnDownKeep, OnFailbackKeep},
		{"ssh", Health{Kind: HealthSendExpect, Interval: DefaultHealthInterval, Timeout: DefaultHealthTimeout, Rise: DefaultHealthRise,
			Fall: DefaultHealthFall, ExpectRegex: `^SSH-2\.0-`}, DefaultPassiveFall, PanicNone, OnDownKeep, OnFailbackKeep},
		// Over UDP, send_expect must send something (see TestParseErrors),
		// and passive detection is off: nothing would feed it.
		{"dns", Health{Kind: HealthSendExpect, Interval: DefaultHealthInterval, Timeout: DefaultHealthTimeout, Rise: DefaultHealthRise,
			Fall: DefaultHealthFall, Send: "ping", Expect: "pong"}, 0, PanicNone, OnDownKeep, OnFailbackKeep},
	}
	for _, tt := range tests {
		svc := cfg.Service(tt.service)
		if svc.Health != tt.health {
			t.Errorf("%s: health\n%+v\nwant\n%+v", tt.service, svc.Health, tt.health)
		}
		if svc.PassiveFall != tt.passiveFall || svc.PanicMode != tt.panicMode || svc.OnDown != tt.onDown || svc.OnFailback != tt.onFailback {
			t.Errorf("%s: passive_fall %d panic_mode %q on_down %q on_failback %q; want %d %q %q %q", tt.service,
				svc.PassiveFall, svc.PanicMode, svc.OnDown, svc.OnFailback, tt.passiveFall, tt.panicMode, tt.onDown, tt.onFailback)
		}
	}
}
