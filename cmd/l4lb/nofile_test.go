package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
)

func TestFlowDescriptorShortfall(t *testing.T) {
	parse := func(maxFlows ...int) *config.Config {
		s := "[services.tcp]\nlisten = \"127.0.0.1:7000\"\n[[services.tcp.backends]]\naddress = \"127.0.0.1:7001\"\n"
		for i, n := range maxFlows {
			s += fmt.Sprintf("[services.u%d]\nlisten = \"127.0.0.1:%d\"\nprotocol = \"udp\"\nmax_flows = %d\n[services.u%d.health]\nkind = \"none\"\n[[services.u%d.backends]]\naddress = \"127.0.0.1:7001\"\n",
				i, 7100+i, n, i, i)
		}
		cfg, err := config.Parse([]byte(s), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	tests := []struct {
		cfg    *config.Config
		nofile uint64
		want   int64
	}{
		{parse(), 1024, 0},
		{parse(500, 400), 1024, 0},
		{parse(500, 500), 1024, 1000 - (1024 - fdReserve)},
		{parse(config.DefaultMaxFlows), 20000, config.DefaultMaxFlows - (20000 - fdReserve)},
		{parse(config.DefaultMaxFlows), 524288, 0},
	}
	for i, tt := range tests {
		if got := flowDescriptorShortfall(tt.cfg, tt.nofile); got != tt.want {
			t.Errorf("case %d: shortfall %d, want %d", i, got, tt.want)
		}
	}
}

// The max_flows warning comes at start and again only when a reload
// changes the shortfall: not on every reload.
func TestFlowWarningNotRepeated(t *testing.T) {
	parse := func(maxFlows int) *config.Config {
		t.Helper()
		cfg, err := config.Parse([]byte(fmt.Sprintf(`[services.game]
listen = "127.0.0.1:7777"
protocol = "udp"
max_flows = %d
  [services.game.health]
  kind = "none"
  [[services.game.backends]]
  address = "10.0.0.1:7777"
`, maxFlows)), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	var out bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &out})
	var warned int64
	for _, maxFlows := range []int{5000, 5000, 6000, 6000, 100, 5000} {
		warnFlowDescriptors(log, parse(maxFlows), 1024, &warned)
	}
	// Warned at 5000 (start), 6000 (changed) and 5000 again (after it fit).
	if n := strings.Count(out.String(), "udp max_flows exceed RLIMIT_NOFILE"); n != 3 {
		t.Errorf("%d warnings, want 3:\n%s", n, out.String())
	}
}
