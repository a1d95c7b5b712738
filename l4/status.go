package l4

import (
	"net/netip"
	"sort"
	"sync/atomic"
	"time"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// connectBuckets are the upper bounds of the connect-time histogram:
// from a same-rack backend (well under a millisecond) to one behind a
// congested link (seconds; connect_timeout is 3 s by default).
var connectBuckets = [...]time.Duration{
	250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond,
	5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond, time.Second,
	2500 * time.Millisecond, 5 * time.Second,
}

// latencyHistogram is a fixed-bucket histogram of atomics: observing is
// two atomic adds and a short scan, with no lock and no allocation, so the
// data path can afford it on every connection. Prometheus' own Histogram
// would do too, but would tie each backend's state to a registry.
type latencyHistogram struct {
	counts [len(connectBuckets) + 1]atomic.Uint64 // the last is +Inf
	sumNs  atomic.Int64
}

func (h *latencyHistogram) observe(d time.Duration) {
	i := 0
	for i < len(connectBuckets) && d > connectBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(int64(d))
}

// snapshot returns cumulative counts per bucket bound (in seconds), the
// total count and the sum in seconds, as Prometheus wants them.
func (h *latencyHistogram) snapshot() (buckets map[float64]uint64, count uint64, sum float64) {
	buckets = make(map[float64]uint64, len(connectBuckets))
	for i, bound := range connectBuckets {
		count += h.counts[i].Load()
		buckets[bound.Seconds()] = count
	}
	count += h.counts[len(connectBuckets)].Load()
	return buckets, count, time.Duration(h.sumNs.Load()).Seconds()
}

// ServerStatus is a point-in-time view of everything running.
type ServerStatus struct {
	Version  uint64
	Hash     string
	LoadedAt time.Time
	// OpenConnections counts the TCP connections open over all services
	// against MaxConnections, the bound derived from RLIMIT_NOFILE (both 0
	// without a bound).
	OpenConnections, MaxConnections int64
	// Stopping: Shutdown has begun; Services are draining.
	Stopping bool
	Services []ServiceStatus // by name
}

// ServiceStatus is one service's state and counters.
type ServiceStatus struct {
	Name     string
	Listen   netip.AddrPort
	Protocol config.Protocol
	Balance  config.Balance
	// Checked: the service probes its backends; without checks every
	// backend counts as up.
	Checked bool
	// RoutingToBackups: no primary backend is usable, and new connections
	// go to the usable backups.
	RoutingToBackups bool
	// Accepted counts TCP connections accepted; Refused those closed at
	// once because no backend could take them.
	Accepted, Refused uint64
	ProxyErrors       uint64
	HealthRebuilds    uint64
	Backends          []BackendStatus // configured ones by address, then draining ones
	// UDP is set for UDP services.
	UDP *UDPStats

	// Rejected counts TCP clients closed by a limit, an access list or the
	// PROXY protocol checks, by reason.
	Rejected [NumRejectReasons]uint64
}

// BackendStatus is one backend's state and counters.
type BackendStatus struct {
	Address netip.AddrPort
	// Weight is 0 for a backend removed from the config that still drains.
	Weight     int
	Configured bool
	// Backup: backup = true in the config; it takes new connections only
	// while no primary is usable.
	Backup bool
	// InRoute says the backend takes new connections now.
	InRoute bool
	Health  health.Snapshot
	BackendStats
	Draining      bool
	DrainDeadline time.Time
	UDP           *UDPBackendStats
	connectTime   *latencyHistogram
}

// Status returns a view of the running config and every service.
func (srv *Server) Status() ServerStatus {
	srv.mu.Lock()
	st := ServerStatus{Version: srv.version, LoadedAt: srv.loaded, Stopping: srv.closed}
	if srv.current != nil {
		st.Hash = srv.current.Hash
	}
	if srv.gate != nil {
		st.OpenConnections, st.MaxConnections = srv.gate.open.Load(), srv.gate.max
	}
	running := make([]*runningService, 0, len(srv.running))
	for _, rs := range srv.running {
		running = append(running, rs)
	}
	srv.mu.Unlock()
	for _, rs := range running {
		st.Services = append(st.Services, rs.svc.Status())
	}
	sort.Slice(st.Services, func(i, j int) bool { return st.Services[i].Name < st.Services[j].Name })
	return st
}

// Status returns the service's state and counters.
func (s *Service) Status() ServiceStatus {
	r := s.route.Load()
	inRoute := make(map[*Backend]bool, len(r.backends))
	for _, be := range r.backends {
		inRoute[be] = true
	}
	s.mu.Lock()
	cfg := s.cfg
	st := ServiceStatus{
		Name: cfg.Name, Listen: cfg.Listen, Protocol: cfg.Protocol, Balance: cfg.Balance, Checked: !checksOff(cfg),
		Accepted: s.accepted.Load(), Refused: s.refused.Load(), ProxyErrors: s.proxyErrors.Load(),
		HealthRebuilds: s.HealthRebuilds(), Rejected: s.Rejected(), RoutingToBackups: r.backups,
	}
	var bes []*Backend // parallel to st.Backends
	add := func(be *Backend, weight int, configured, backup bool) {
		bes = append(bes, be)
		bs := BackendStatus{
			Address: be.addr, Weight: weight, Configured: configured, Backup: backup, InRoute: r.balancer != nil && inRoute[be],
			BackendStats: be.Stats(), Draining: be.drainTimer != nil, DrainDeadline: be.drainDeadline,
			connectTime: &be.connectTime,
		}
		if cfg.Protocol == config.UDP {
			u := be.UDPStats()
			bs.UDP = &u
		}
		st.Backends = append(st.Backends, bs)
	}
	for _, b := range cfg.Backends {
		if be := s.backends[b.Address]; be != nil {
			add(be, b.Weight, true, b.Backup)
		}
	}
	draining := make([]*Backend, 0, len(s.draining))
	for _, be := range s.draining {
		draining = append(draining, be)
	}
	s.mu.Unlock()
	sort.Slice(draining, func(i, j int) bool { return draining[i].addr.Compare(draining[j].addr) < 0 })
	for _, be := range draining {
		add(be, 0, false, false)
	}
	// Health snapshots take the tracker's own lock, which health
	// transitions hold while they take s.mu: read them outside s.mu.
	for i, be := range bes {
		st.Backends[i].Health = be.Health()
	}
	if u, ok := s.UDPStats(); ok {
		st.UDP = &u
	}
	return st
}
