// Package config reads l4lb's TOML configuration, validates all of it, and
// compiles it into an immutable Config that the rest of l4lb reads.
//
// Usage:
//
//	cfg, err := config.Load("/etc/l4lb/l4lb.toml")
//	if err != nil {
//		// err is an *Errors listing every problem, each naming file:line:col
//		// (syntax) or the dotted key (values).
//	}
//
// The TOML-shaped structs stay inside this package: callers only ever see
// Config, whose addresses are already parsed and whose defaults are filled in.
// A Config is never modified after Load returns, so it can be shared between
// goroutines without locks. This package imports none of l4lb's packages.
package config

import (
	"net/netip"
	"time"
)

// Protocol is the transport a service balances.
type Protocol string

const (
	TCP Protocol = "tcp"
	UDP Protocol = "udp"
)

// Balance names the algorithm that picks a backend for a new connection.
type Balance string

const (
	Maglev     Balance = "maglev"
	RoundRobin Balance = "round_robin"
	LeastConn  Balance = "least_conn"
)

// HashKey says which part of the client address Maglev hashes.
type HashKey string

const (
	SourceIP     HashKey = "source_ip"
	SourceIPPort HashKey = "source_ip_port"
)

// Config is one complete, validated configuration.
type Config struct {
	// Path is the file the config was read from ("" when parsed from bytes).
	Path string
	// Hash is the SHA-256 of the file's bytes, hex encoded: two loads of the
	// same bytes compare equal, which lets a reload of an unchanged file be a
	// no-op.
	Hash   string
	Admin  Admin
	Reload Reload
	Log    Log
	// Process is read once at start; a reload does not change who l4lb
	// runs as.
	Process Process
	// Services are sorted by name.
	Services []Service
}

// Admin configures the local admin HTTP endpoint.
type Admin struct {
	// Listen is "" when the admin endpoint is disabled.
	Listen string
}

// Reload configures how the running process picks up config changes.
type Reload struct {
	// Watch makes l4lb reload when the config file changes (inotify),
	// besides on SIGHUP.
	Watch bool
}

// Service is one balanced listen address.
type Service struct {
	Name     string
	Listen   netip.AddrPort
	Protocol Protocol
	Balance  Balance
	HashKey  HashKey
	// Workers is the number of SO_REUSEPORT sockets, already resolved from 0
	// ("one per core") to a positive count.
	Workers        int
	ConnectTimeout time.Duration
	// IdleTimeout ends a TCP connection or a UDP flow in which nothing
	// moved for that long; its default depends on Protocol.
	IdleTimeout  time.Duration
	DrainTimeout time.Duration
	// MaxFlows caps the open flows of a UDP service (0 for TCP services):
	// past it, datagrams that would open a flow are dropped and counted.
	MaxFlows int
	// RepliesPerDatagram is how many datagrams a UDP service's backends
	// send back for each client datagram (DNS: 1): a flow that has all it
	// asked for ends at once. 0: not counted, flows end at IdleTimeout.
	RepliesPerDatagram int
	// Health is how backends are checked (see health.go); its Kind is
	// HealthNone, every backend healthy, without a [health] table.
	Health Health
	// PassiveFall is how many consecutive connect failures seen by the
	// data path mark a backend down until the active check brings it back;
	// 0 is off, and so is every service with Health.Kind HealthNone and
	// every UDP service (no connects to fail).
	PassiveFall int
	PanicMode   PanicMode
	OnDown      OnDown
	// OnFailback applies when the route moves from the backups back to
	// the primaries (backup = true; l4/health.go).
	OnFailback OnFailback
	// Protect holds connection limits, access lists, half_close_timeout
	// and the PROXY protocol settings (protect.go).
	Protect
	// Backends keep the order of the file. Balancers that need an order of
	// their own (Maglev) sort by address so every node builds the same table.
	Backends []Backend
}

// Backend is one destination of a service.
type Backend struct {
	Address netip.AddrPort
	// Weight is in [0, MaxWeight]; 0 keeps the backend configured (its open
	// connections live on) but sends it no new connections.
	Weight int
	// MaxConnections bounds the backend's open TCP connections from this
	// service; 0 is no limit. A full backend is skipped for the next one
	// in the key's order.
	MaxConnections int
	// Backup keeps the backend out of the route while any backend that is
	// not a backup has weight > 0 and is usable (up, or not checked), as
	// HAProxy's and nginx's `backup` servers: a standby that takes new
	// connections only when no primary can. Every service has at least
	// one primary.
	Backup bool
}

// Service returns the service called name, or nil.
func (c *Config) Service(name string) *Service {
	for i := range c.Services {
		if c.Services[i].Name == name {
			return &c.Services[i]
		}
	}
	return nil
}
