package l4

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// RejectReason says why a TCP client was closed before any byte reached a
// backend, by a limit, an access list or the PROXY protocol checks.
// (Clients closed because no backend answered are counted as refused.)
type RejectReason int

const (
	// RejectDenied: the client address is in deny, or outside a non-empty
	// allow.
	RejectDenied RejectReason = iota
	// RejectUntrustedProxy: accept_proxy_protocol is on and the connection
	// does not come from trusted_proxies.
	RejectUntrustedProxy
	// RejectBadProxyHeader: the PROXY header is malformed, too long, or the
	// client closed before sending it whole.
	RejectBadProxyHeader
	// RejectProxyHeaderTimeout: no complete PROXY header within
	// proxy_protocol_timeout.
	RejectProxyHeaderTimeout
	// RejectMaxConnections: the service has max_connections open.
	RejectMaxConnections
	// RejectMaxConnectionsPerSource: the client address has
	// max_connections_per_source open.
	RejectMaxConnectionsPerSource
	// RejectBackendsFull: every backend in the key's order has its
	// max_connections open.
	RejectBackendsFull

	// NumRejectReasons is the number of reasons, for arrays indexed by them.
	NumRejectReasons
)

var rejectReasonNames = [NumRejectReasons]string{
	"denied", "untrusted_proxy", "bad_proxy_header", "proxy_header_timeout",
	"max_connections", "max_connections_per_source", "backends_full",
}

// String is the reason's name as metrics and logs show it.
func (r RejectReason) String() string {
	if r < 0 || r >= NumRejectReasons {
		return "unknown"
	}
	return rejectReasonNames[r]
}

// sourceShards spreads per-source counts over independent locks.
const (
	sourceShardBits = 6
	sourceShards    = 1 << sourceShardBits
)

// sourceLimiter counts the open connections of each client address, for
// max_connections_per_source.
//
// A sharded map with a small mutex per shard, rather than something
// lock-free: the count must be exact (a limit of 2 means 2) and an address
// must leave the map when its last connection closes, or a scan of the
// IPv6 space would grow it without bound. Both are a map operation under a
// lock, held for tens of nanoseconds, twice per connection. With 64 shards
// two cores meet on one lock only when their clients hash alike, and the
// shards sit on their own cache lines so unrelated shards do not share
// one. A connection already costs two accept/connect syscalls, which dwarf
// this.
type sourceLimiter struct {
	shards [sourceShards]sourceShard
}

type sourceShard struct {
	mu   sync.Mutex // guards open
	open map[netip.Addr]int32
	_    [64 - 16]byte // pad to a cache line: mu (8) + map pointer (8)
}

func (l *sourceLimiter) shard(a netip.Addr) *sourceShard {
	b := a.As16()
	// Both halves of the address folded by a multiply (Fibonacci hashing),
	// the shard taken from the top bits, which every input bit reaches:
	// spreads IPv4 clients (the low half) and IPv6 ones (both halves) in
	// two multiplies, where FNV-1a over the 16 bytes took 16 in a chain.
	h := (binary.BigEndian.Uint64(b[:8])*0x9e3779b97f4a7c15 ^ binary.BigEndian.Uint64(b[8:])) * 0x9e3779b97f4a7c15
	return &l.shards[h>>(64-sourceShardBits)]
}

// acquire counts one more connection of a; it refuses, counting nothing,
// when a already has limit connections open (limit 0: no limit).
func (l *sourceLimiter) acquire(a netip.Addr, limit int) bool {
	s := l.shard(a)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open == nil {
		s.open = make(map[netip.Addr]int32)
	}
	n := s.open[a]
	if limit > 0 && int(n) >= limit {
		return false
	}
	s.open[a] = n + 1
	return true
}

// release gives back a slot taken by acquire.
func (l *sourceLimiter) release(a netip.Addr) {
	s := l.shard(a)
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.open[a]; n > 1 {
		s.open[a] = n - 1
	} else {
		delete(s.open, a)
	}
}

// count is a's open connections, for tests.
func (l *sourceLimiter) count(a netip.Addr) int {
	s := l.shard(a)
	s.mu.Lock()
	defer s.mu.Unlock()
	return int(s.open[a])
}

// lease records that admission counted a connection, in Service.open and
// under its source address, so that its close gives back exactly that.
type lease struct {
	source  netip.Addr
	counted bool
}

// admit applies the access list and the service and per-source limits to
// a client at src. On success the caller must pass the lease to
// releaseLease when the connection ends.
//
// Every admitted connection is counted, in Service.open and per source,
// whether or not the route sets a limit: a limit that a reload sets (from
// 0 during an incident, say) then counts the connections already open, as
// a backend's max_connections always has (Backend.active). Counting when
// no limit is set costs an admission and its release about 0.1 µs more
// (BenchmarkAdmit: 15 ns without the counts, 115-140 with; the per-source
// map is most of it), about a thousandth of the CPU l4lb spends on a
// proxied connection (95 µs in the README's redis -k 0 row), and a map
// entry per client address with connections open.
func (s *Service) admit(r *route, src netip.Addr) (lease, RejectReason, bool) {
	if !r.acl.admits(src) {
		return lease{}, RejectDenied, false
	}
	if n := s.open.Add(1); r.cfg.MaxConnections > 0 && n > int64(r.cfg.MaxConnections) {
		s.open.Add(-1)
		return lease{}, RejectMaxConnections, false
	}
	if !s.sources.acquire(src, r.cfg.MaxConnectionsPerSource) {
		s.open.Add(-1)
		return lease{}, RejectMaxConnectionsPerSource, false
	}
	return lease{source: src, counted: true}, 0, true
}

func (s *Service) releaseLease(l lease) {
	if l.counted {
		s.open.Add(-1)
		s.sources.release(l.source)
	}
}

// connGate bounds the TCP connections open over all services of a Server,
// so that l4lb never runs out of descriptors for the ones it has: at the
// bound the acceptors stop accepting, new clients wait in the kernel's
// accept queue (as with HAProxy's maxconn), and open connections keep
// their sockets and can still get the pipes they need to move bytes. The
// count is one atomic; acceptors that find the gate full look again every
// gateRecheck (loop.go).
type connGate struct {
	max  int64
	open atomic.Int64
}

func newConnGate(max int64) *connGate { return &connGate{max: max} }

func (g *connGate) tryAcquire() bool {
	if g.open.Add(1) <= g.max {
		return true
	}
	g.open.Add(-1)
	return false
}

func (g *connGate) release() { g.open.Add(-1) }

// force takes a slot past the bound.
func (g *connGate) force() { g.open.Add(1) }

// peer is who a client connection is from as l4lb routes, filters and
// reports it: the socket's remote address, or, behind a trusted balancer,
// the one its PROXY header carries.
type peer struct {
	src netip.AddrPort
	// dst is the address the client connected to, as a PROXY header
	// carried it; zero means the socket's own local address.
	dst netip.AddrPort
	// headerDue: the PROXY header is still to be read (proxyConn.readHeader).
	headerDue bool
	lease     lease
}

// reject closes a client that a limit, access list or PROXY check turned
// away, and counts it. The close is a reset (SO_LINGER 0): the client
// learns at once, and a flood of rejected clients leaves no TIME_WAIT
// sockets on the balancer.
func (s *Service) reject(client int, src netip.AddrPort, reason RejectReason, err error) {
	s.countReject(src, reason, err)
	rawResetOnClose(client)
	rawClose(client)
}

// countReject counts a rejection and logs it, at most once a second per
// service.
func (s *Service) countReject(src netip.AddrPort, reason RejectReason, err error) {
	n := s.rejected[reason].Add(1)
	if s.allowLog(&s.lastReject) {
		args := []any{"service", s.Name(), "client", src.String(), "reason", reason.String(), "rejected_total", n}
		if err != nil {
			args = append(args, "error", err)
		}
		s.log.Warn("closing client: rejected", args...)
	}
}

// releaseSlot gives back the connection's slot of the Server's gate.
func (s *Service) releaseSlot() {
	if s.gate != nil {
		s.gate.release()
	}
}

// Rejected returns the service's rejections by reason.
func (s *Service) Rejected() [NumRejectReasons]uint64 {
	var out [NumRejectReasons]uint64
	for i := range out {
		out[i] = s.rejected[i].Load()
	}
	return out
}

// backendLimits returns the max_connections of each of backends, or nil
// when none has one, so that connect skips the check.
func backendLimits(cfg *config.Service, backends []*Backend) []int64 {
	var limits []int64
	for i, be := range backends {
		for _, b := range cfg.Backends {
			if b.Address == be.addr && b.MaxConnections > 0 {
				if limits == nil {
					limits = make([]int64, len(backends))
				}
				limits[i] = int64(b.MaxConnections)
			}
		}
	}
	return limits
}

// isLocalShortage reports a failed connect that any backend would fail
// alike: this host's shortage (health.LocalShortage), but for a local
// port toward one backend (EADDRNOTAVAIL), which another backend may still
// have (blamesBackend), or a UDP flow socket the netpoller cannot watch.
func isLocalShortage(err error) bool {
	return errors.Is(err, errNotWatched) || health.LocalShortage(err) && blamesBackend(err)
}

// blamesBackend reports whether a failed connect counts against the
// backend's passive health. No free local port to its address
// (EADDRNOTAVAIL) is this host's shortage, not the backend's failure:
// another backend has ports of its own, so the connection tries the next
// one, but a healthy backend must not be marked down for it.
func blamesBackend(err error) bool {
	return !errors.Is(err, syscall.EADDRNOTAVAIL)
}

// protectionChanged reports whether a reload changes any limit, access
// list, timeout or PROXY setting of a service, for the reload's summary.
func protectionChanged(prev, sc *config.Service) bool {
	a, b := prev.Protect, sc.Protect
	if a.MaxConnections != b.MaxConnections || a.MaxConnectionsPerSource != b.MaxConnectionsPerSource ||
		a.HalfCloseTimeout != b.HalfCloseTimeout || a.ProxyProtocol != b.ProxyProtocol ||
		a.AcceptProxyProtocol != b.AcceptProxyProtocol || a.ProxyProtocolTimeout != b.ProxyProtocolTimeout ||
		!slices.Equal(a.Allow, b.Allow) || !slices.Equal(a.Deny, b.Deny) || !slices.Equal(a.TrustedProxies, b.TrustedProxies) {
		return true
	}
	limits := make(map[netip.AddrPort]int, len(prev.Backends))
	for _, be := range prev.Backends {
		limits[be.Address] = be.MaxConnections
	}
	for _, be := range sc.Backends {
		if old, ok := limits[be.Address]; ok && old != be.MaxConnections {
			return true
		}
	}
	return false
}
