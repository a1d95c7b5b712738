package main

import (
	"fmt"
	"testing"

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
