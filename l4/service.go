package l4

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/listener"
)

// maxDialAttempts is the first choice plus up to two more backends in the
// key's order before a client is turned away.
const maxDialAttempts = 3

// route is what the data path reads for a new connection: immutable, built
// on the control side, published with one atomic store.
type route struct {
	cfg *config.Service
	// backends are the balancer's members, in the order it was built from:
	// those with weight > 0 that pass their health checks, the primaries
	// or else the backups (health.go, choose).
	backends []*Backend
	// balancer is nil when no backend may take new connections.
	balancer balancer
	// panicking: no backend passes its checks, and panic_mode = "all"
	// routes to every weighted one.
	panicking bool
	// backups: no primary is usable, and backends holds the usable
	// backups.
	backups bool
	// backupsLast: the last route that had a balancer was on the backups:
	// this one, or the ones since had none (every backend down, no
	// panic). The primaries coming back after it is a failback
	// (on_failback), even when the backups went down in between: under
	// on_down = "keep" their clients are still there.
	backupsLast bool
	// acl and trusted are cfg's allow/deny and trusted_proxies (acl.go).
	acl     accessList
	trusted []netip.Prefix
	// backendMax is each backend's max_connections, parallel to backends;
	// nil when no backend has a limit.
	backendMax []int64
}

// Service balances the connections of one configured service. Its
// acceptors (loop.go) call admitClient; the control side calls Update and
// Drain.
type Service struct {
	log hclog.Logger

	route atomic.Pointer[route]

	mu  sync.Mutex // guards cfg, backends, draining and Backend drain fields
	cfg *config.Service
	// backends holds the state of every configured backend by address, so
	// that an Update keeps the state of the ones that stay.
	backends map[netip.AddrPort]*Backend
	// draining holds removed backends whose connections are still open.
	draining map[netip.AddrPort]*Backend
	// firstChecksDue is when a reload's wait for its new backends' first
	// checks ends (keepPreviousRoute), zero when none is waited for;
	// firstChecksTimer rebuilds the route then.
	firstChecksDue   time.Time
	firstChecksTimer *time.Timer

	health serviceHealth // checks, passive detection, rebuilds on change: health.go

	handlers sync.WaitGroup // connections handed to event loops and not yet closed

	waitingMu sync.Mutex // guards waiting
	// waiting links the connections still reading their PROXY header,
	// which are on no backend's list yet, so that Drain can cut them.
	// Threaded through proxyConn's links, which a connection takes for
	// its backend's list only after it has left this one.
	waiting proxyConnList
	// cut is set once Drain's deadline has passed: no connection of the
	// service dials a backend from then on.
	cut atomic.Bool

	// logConnections, when set and true, logs a line per closed
	// connection; the Server owns it, so one reload switches every service.
	logConnections *atomic.Bool

	// udp is the data path of a UDP service (udp.go), nil for TCP; set once
	// by the Server before the service is published.
	udp *udpProxy

	accepted    atomic.Uint64 // TCP connections accepted
	refused     atomic.Uint64 // clients closed because no backend could take them
	lastRefusal atomic.Int64  // monotonicNow of the last refusal log line
	proxyErrors atomic.Uint64 // connections that ended with an error other than idle

	// Protection (limits.go): open counts the admitted connections, for
	// max_connections, and sources those of each client address, for
	// max_connections_per_source, whether or not a limit is set.
	open       atomic.Int64
	sources    sourceLimiter
	rejected   [NumRejectReasons]atomic.Uint64
	lastReject atomic.Int64 // monotonicNow of the last rejection log line
	// gate, when set by the Server, is the process-wide bound on open TCP
	// connections; each accepted connection holds a slot until it closes
	// or is turned away.
	gate *connGate
}

// NewService returns a service that routes by cfg.
func NewService(cfg *config.Service, log hclog.Logger) *Service {
	s := &Service{
		log:      log,
		backends: make(map[netip.AddrPort]*Backend),
		draining: make(map[netip.AddrPort]*Backend),
	}
	s.health.init(log, s.rebuildForHealth)
	s.Update(cfg)
	return s
}

// Name is the service's name from the config.
func (s *Service) Name() string { return s.route.Load().cfg.Name }

// Update makes cfg the service's routing for new connections. Connections
// already open keep their backend. Backends that leave the route (removed,
// or weight 0) drain: their open connections go on until they close or
// cfg.DrainTimeout passes, then are closed. A backend that comes back while
// draining keeps its connections.
func (s *Service) Update(cfg *config.Service) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg = cfg
	s.rebuildLocked()
}

// rebuildLocked builds and publishes the route from s.cfg and starts or
// stops drains to match. s.mu must be held.
func (s *Service) rebuildLocked() {
	cfg := s.cfg
	prev := s.route.Load()
	r := &route{cfg: cfg,
		acl: accessList{allow: cfg.Allow, deny: cfg.Deny}, trusted: cfg.TrustedProxies}
	// Weighted backends by tier: a backup serves only while no primary
	// can (health.go, choose).
	var primaries, backups tier
	var unweighted []*Backend
	kept := make(map[netip.AddrPort]*Backend, len(cfg.Backends))
	for _, b := range cfg.Backends {
		be := s.backends[b.Address]
		if be == nil {
			be = s.draining[b.Address]
			delete(s.draining, b.Address)
		}
		if be == nil {
			be = newBackend(b.Address)
		}
		kept[b.Address] = be
		if b.Weight > 0 {
			// A backup out of the route is not draining: its open
			// connections stay, as HAProxy's do, and it takes new ones
			// again as soon as no primary can.
			be.setRefuseNew(false) // before the route that offers it
			s.stopDrainLocked(be)
			t := &primaries
			if b.Backup {
				t = &backups
			}
			m := member{key: be.addr.String(), weight: b.Weight, active: &be.active}
			if !usable(cfg, be) {
				t.down = append(t.down, standby{be, m})
				continue
			}
			t.backends = append(t.backends, be)
			t.members = append(t.members, m)
		} else {
			unweighted = append(unweighted, be)
		}
	}
	if len(primaries.members) == 0 && s.keepPreviousRoute(cfg, awaited(primaries, backups)) {
		// The previous backends stay in s.backends, so that the rebuild
		// that ends the wait drains them.
		for addr, be := range s.backends {
			if kept[addr] == nil {
				kept[addr] = be
			}
		}
		s.backends = kept
		s.health.sync(cfg, kept)
		return
	}
	s.stopFirstChecksWait()
	for _, be := range unweighted {
		s.startDrainLocked(be, cfg.DrainTimeout)
	}
	var members []member
	r.backends, members, r.panicking, r.backups = s.health.choose(cfg, primaries, backups)
	r.backendMax = backendLimits(cfg, r.backends)
	if len(members) > 0 {
		r.balancer = newBalancer(cfg.Balance, members)
	}
	r.backupsLast = r.backups || (r.balancer == nil && prev != nil && prev.backupsLast)
	removed := s.backends
	s.backends = kept
	s.route.Store(r)
	if cfg.OnFailback == config.OnFailbackClose && failedBack(prev, r) {
		s.closeBackupsLocked(cfg, prev, r)
	}
	for _, be := range unweighted {
		if be.drainTimer == nil {
			// Nothing to drain: refuse now, after the swap, so that a
			// connection turned away starts over on a route without it.
			be.setRefuseNew(true)
			// UDP flows that picked it from the previous route while the
			// table was built: no drain will reach them.
			be.udp.closeFlows()
		}
	}
	// Removed backends drain or retire only once no route holds them: a
	// connection that finds its backend retired starts over on the
	// current route, which must not offer it again.
	for addr, be := range removed {
		if kept[addr] != nil {
			continue
		}
		s.startDrainLocked(be, cfg.DrainTimeout)
		if be.drainTimer == nil && !be.retireIfIdle() {
			// A connection registered since startDrainLocked looked.
			s.startDrainLocked(be, cfg.DrainTimeout)
		} else if be.drainTimer == nil {
			// Retired: close UDP flows linked since startDrainLocked looked
			// (retireIfIdle sees only TCP connections).
			be.udp.closeFlows()
		}
		if be.drainTimer != nil {
			s.draining[addr] = be
		}
	}
	s.health.sync(cfg, kept)
}

// startDrainLocked arms the drain deadline of a backend that no longer
// takes new connections. A drain already running keeps its deadline, so
// that reloads in the middle of a drain do not extend it.
func (s *Service) startDrainLocked(be *Backend, timeout time.Duration) {
	if be.drainTimer != nil || be.active.Load() == 0 {
		return
	}
	be.drainDeadline = time.Now().Add(timeout)
	var timer *time.Timer
	timer = time.AfterFunc(timeout, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if be.drainTimer != timer {
			return // cancelled: the backend came back
		}
		be.drainTimer = nil
		n := be.active.Load()
		if s.draining[be.addr] == be {
			delete(s.draining, be.addr)
			be.retire()
		} else {
			// Weight 0: it stays configured, and takes no connection
			// until its weight comes back.
			be.setRefuseNew(true)
			be.closeConns()
		}
		s.log.Info("drain finished", "service", s.cfg.Name, "backend", be.addr, "closed_connections", n)
	})
	be.drainTimer = timer
	s.log.Info("draining backend", "service", s.cfg.Name, "backend", be.addr, "open_connections", be.active.Load(), "deadline", be.drainDeadline.Format(time.RFC3339))
}

func (s *Service) stopDrainLocked(be *Backend) {
	if be.drainTimer == nil {
		return
	}
	be.drainTimer.Stop()
	be.drainTimer = nil
	be.drainDeadline = time.Time{}
	s.log.Info("backend back in service, drain cancelled", "service", s.cfg.Name, "backend", be.addr, "open_connections", be.active.Load())
}

// Backends returns the state of every configured backend and of removed
// backends still draining.
func (s *Service) Backends() []*Backend {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Backend, 0, len(s.backends)+len(s.draining))
	for _, be := range s.backends {
		out = append(out, be)
	}
	for _, be := range s.draining {
		out = append(out, be)
	}
	return out
}

// admitClient takes a client its acceptor just accepted on loop l: it
// returns the connection to begin there, or nil when the client was
// turned away (closed and counted). The connection is counted before
// admitClient returns, so that a Drain that starts once the acceptors
// have stopped waits for it.
//
// The access list and limits are checked here, before any dial, so that a
// flood of refused clients costs an accept and a close each. Behind a
// balancer (accept_proxy_protocol) only the trusted_proxies check can run
// here: the rest waits for the header.
func (s *Service) admitClient(conn listener.Conn, l *eventLoop) *proxyConn {
	s.accepted.Add(1)
	r := s.route.Load()
	p := peer{src: conn.Peer}
	if r.cfg.AcceptProxyProtocol {
		if !containsAddr(r.trusted, p.src.Addr()) {
			s.reject(conn.FD, p.src, RejectUntrustedProxy, nil)
			s.releaseSlot()
			return nil
		}
		p.headerDue = true
	} else {
		lease, reason, ok := s.admit(r, p.src.Addr())
		if !ok {
			s.reject(conn.FD, p.src, reason, nil)
			s.releaseSlot()
			return nil
		}
		p.lease = lease
	}
	s.handlers.Add(1)
	return &proxyConn{svc: s, loop: l, client: conn.FD, backend: -1, peer: p, timerIndex: -1}
}

// refuse counts a client closed for want of a backend, and logs it at
// most once a second.
func (s *Service) refuse(client netip.AddrPort, reason string) {
	n := s.refused.Add(1)
	if s.allowLog(&s.lastRefusal) {
		s.log.Warn("closing client: no backend available", "service", s.Name(), "client", client.String(), "reason", reason, "refused_total", n)
	}
}

// allowLog rate-limits a log line to one per second: a dead backend pool
// must not turn every refused connection into a line of log.
func (s *Service) allowLog(last *atomic.Int64) bool {
	now := monotonicNow()
	prev := last.Load()
	if prev != 0 && now-prev < int64(time.Second) {
		return false
	}
	return last.CompareAndSwap(prev, now)
}

// Drain waits for open connections to end by themselves until deadline,
// then closes the rest; it returns once every connection is closed, with
// how many were still open at deadline. Call it after the service's
// listeners are closed, so that no new connection arrives.
func (s *Service) Drain(deadline time.Time) (cut int64) {
	s.health.close()
	s.mu.Lock()
	s.stopFirstChecksWait()
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-done:
		return 0
	case <-timer.C:
	}
	// From here no connection dials (dialNext): one whose PROXY header
	// completes now is closed instead of opening a backend connection.
	s.cut.Store(true)
	cut = s.openConnections()
	s.abortWaiting()
	// A handler may still be dialing when the deadline passes and register
	// its connection after a sweep; sweep again until every handler is gone.
	// Dials are bounded by connect_timeout, so this ends.
	ticker := time.NewTicker(50 * time.Millisecond)
	defer ticker.Stop()
	for {
		for _, be := range s.Backends() {
			be.closeConns()
		}
		select {
		case <-done:
			return cut
		case <-ticker.C:
		}
	}
}

// openConnections is how many connections are open now: proxied ones,
// those to draining backends included, and those still reading their
// PROXY header.
func (s *Service) openConnections() int64 {
	var n int64
	for _, be := range s.Backends() {
		n += be.active.Load()
	}
	s.waitingMu.Lock()
	for c := s.waiting.head; c != nil; c = c.next {
		n++
	}
	s.waitingMu.Unlock()
	return n
}

// startWaiting and stopWaiting put a connection on the waiting list
// while it reads its PROXY header, and take it off; on its loop.
func (s *Service) startWaiting(c *proxyConn) {
	s.waitingMu.Lock()
	s.waiting.pushBack(c)
	s.waitingMu.Unlock()
}

func (s *Service) stopWaiting(c *proxyConn) {
	s.waitingMu.Lock()
	s.waiting.remove(c)
	s.waitingMu.Unlock()
}

// abortWaiting has the loops close every connection still reading its
// PROXY header.
func (s *Service) abortWaiting() {
	s.waitingMu.Lock()
	defer s.waitingMu.Unlock()
	for c := s.waiting.head; c != nil; c = c.next {
		c.forced.Store(true)
		c.abort()
	}
}
