package l4

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/listener"
)

// Server runs every service of a config: their listening sockets, acceptors
// and proxied connections, and moves from one config to the next without
// dropping a connection.
//
//	srv := l4.NewServer(logger)
//	if _, err := srv.Apply(ctx, cfg); err != nil { ... } // binds, then serves
//	...
//	srv.Apply(ctx, newCfg) // reload: bind what is new, swap, drain what left
//	...
//	srv.Shutdown() // stops accepting, drains, returns when all is closed
type Server struct {
	log hclog.Logger
	// logConnections is read by every service at each connection close.
	logConnections atomic.Bool
	// gate bounds the TCP connections open over all services (limits.go);
	// nil is no bound. Set before the first Apply.
	gate *connGate
	// geteuid is os.Geteuid, a field for tests: Apply compares it with the
	// user that bound a service's sockets (runningService.uid).
	geteuid func() int

	// retiring counts the drains of services removed by a reload, so that
	// Shutdown waits for them too.
	retiring sync.WaitGroup

	// liveMu guards live: every service that may hold connections or
	// flows, running or draining after a reload removed it. It is held
	// only briefly, never across an Apply, so that OpenConnections
	// answers while an Apply waits for first checks.
	liveMu sync.Mutex
	live   map[*runningService]struct{}

	mu sync.Mutex // guards everything below; held for a whole Apply
	// running is keyed by socket identity (protocol and listen address), not
	// by name: a renamed service keeps its sockets.
	running map[socketKey]*runningService
	// retiringUDP holds UDP services that a reload removed and whose flows
	// still drain. Their sockets stay bound (replies leave by them), so a
	// reload that brings the address back revives them: fresh sockets
	// would join the same SO_REUSEPORT group, and the clients the kernel
	// hashed to the draining ones would be refused.
	retiringUDP map[socketKey]*runningService
	// inherited holds the listening sockets passed by the l4lb this one
	// took over from (Adopt), until the first Apply takes or closes them.
	inherited map[socketKey][]int
	// udpHold, when not nil, holds the UDP services served from inherited
	// sockets until the flows passed with them are in (HoldInheritedUDP).
	udpHold     chan struct{}
	udpHoldOnce sync.Once
	// betweenFlowRounds, for tests, runs in HandOver between its two
	// rounds of passing flows.
	betweenFlowRounds func()
	current           *config.Config
	version           uint64
	loaded            time.Time
	closed            bool
}

type socketKey struct {
	protocol config.Protocol
	listen   netip.AddrPort
}

func keyOf(sc *config.Service) socketKey { return socketKey{sc.Protocol, sc.Listen} }

type runningService struct {
	svc       *Service
	cfg       *config.Service
	listeners []*acceptor
	// uid is the effective user that bound the listening sockets: the
	// kernel adds a socket to a SO_REUSEPORT group only for that user.
	uid int
	// firstLoop is the index of the loop of the first listening socket;
	// socket i goes to loop firstLoop+i, modulo the loop count.
	firstLoop int
	// accepting counts the listening sockets not yet closed by their loops.
	accepting sync.WaitGroup
	// udp runs a UDP service's sockets and flows (listeners is empty then).
	udp *udpProxy
}

// stopAccepting has the loops close the service's listening sockets; it
// returns once they have.
func (rs *runningService) stopAccepting() {
	closeListeners(rs.listeners)
	rs.listeners = nil
	rs.accepting.Wait()
}

func (srv *Server) newService(sc *config.Service) *Service {
	svc := NewService(sc, srv.log)
	svc.logConnections = &srv.logConnections
	svc.gate = srv.gate
	return svc
}

// SetLogConnections switches the per-connection log line of every
// service, now and for services added later.
func (srv *Server) SetLogConnections(on bool) { srv.logConnections.Store(on) }

// SetMaxConnections bounds the TCP connections open over all services
// (0: no bound). At the bound the acceptors stop, and new clients wait
// in the kernel's accept queue, until a connection closes. cmd/l4lb sets
// it from RLIMIT_NOFILE, so that l4lb never runs out of descriptors for
// the connections it has. Call it before the first Apply.
func (srv *Server) SetMaxConnections(n int64) {
	if n > 0 {
		srv.gate = newConnGate(n)
	}
}

// NewServer returns a server with no services.
func NewServer(log hclog.Logger) *Server {
	return &Server{log: log, running: make(map[socketKey]*runningService),
		retiringUDP: make(map[socketKey]*runningService), geteuid: os.Geteuid,
		live: make(map[*runningService]struct{})}
}

// Change describes what an Apply did.
type Change struct {
	// OldVersion and Version are equal when the config was identical to the
	// running one and nothing was done.
	OldVersion, Version uint64
	// Summary is a one-line description of the difference, for the log.
	Summary string
}

// Apply makes cfg the running config. All new sockets are bound before
// anything changes: if one cannot be bound, Apply closes what it bound and
// returns the error with the running config untouched. Services whose
// protocol and listen address stay keep their sockets (closing a
// SO_REUSEPORT socket would reset the connections in its accept queue);
// the others are bound anew or stopped and drained. A config with the same
// content hash as the running one is a no-op.
//
// New services with health checks wait for their first verdict before
// they take clients (start). Once ctx is cancelled (the process stops),
// those not started yet never are: their sockets are closed and they are
// dropped from the running services, and Apply returns.
func (srv *Server) Apply(ctx context.Context, cfg *config.Config) (Change, error) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	change := Change{OldVersion: srv.version, Version: srv.version}
	if srv.closed {
		return change, errors.New("server is shut down")
	}
	if srv.current != nil && srv.current.Hash == cfg.Hash {
		change.Summary = "no change"
		return change, nil
	}

	// Phase 1: bind every socket the new config needs. Nothing running is
	// touched yet.
	fresh := make(map[socketKey][]boundSocket)
	extra := make(map[socketKey][]boundSocket)
	freshUDP := make(map[socketKey][]*net.UDPConn)
	inheritedUDP := make(map[socketKey]bool)
	// freshUID is the user that bound fresh sockets inherited from the
	// l4lb this one took over from; the others are bound now, as geteuid.
	freshUID := make(map[socketKey]int)
	undo := func() {
		for _, lns := range fresh {
			closeBound(lns)
		}
		for _, lns := range extra {
			closeBound(lns)
		}
		for _, conns := range freshUDP {
			for _, c := range conns {
				c.Close()
			}
		}
	}
	for i := range cfg.Services {
		sc := &cfg.Services[i]
		key := keyOf(sc)
		old := srv.running[key]
		if sc.Protocol == config.UDP {
			// A running UDP service keeps its socket group as it is: see
			// the workers note in phase 2.
			if old == nil && srv.retiringUDP[key] == nil {
				// Inherited sockets are the whole group, as a running
				// service's are: the l4lb that passed them reads them no
				// more, so one left out would lose what reaches it.
				conns, err := srv.adoptUDP(key)
				inheritedUDP[key] = len(conns) > 0
				if err == nil && len(conns) == 0 {
					conns, err = listener.ListenUDP(ctx, sc.Listen, sc.Workers)
				} else if err == nil && len(conns) != sc.Workers {
					srv.log.Info("workers of a udp service change at a restart that is not an upgrade: the inherited sockets are kept as they are",
						"service", sc.Name, "sockets", len(conns), "workers", sc.Workers)
				}
				if err != nil {
					undo()
					return change, fmt.Errorf("services.%s.listen: %w", sc.Name, err)
				}
				freshUDP[key] = conns
			}
			continue
		}
		need := sc.Workers
		if old == nil && len(srv.inherited[key]) > 0 {
			// All of them: the l4lb that passed them stops accepting
			// once this one is ready, and a socket left out would strand
			// the clients queued on it.
			adopted, uid := srv.adoptTCP(key)
			fresh[key] = adopted
			freshUID[key] = uid
			need -= len(adopted)
			if euid := srv.geteuid(); need > 0 && uid != euid {
				undo()
				return change, fmt.Errorf("services.%s.workers: %d inherited sockets, %d workers: with process.user, workers can be raised only at a restart that is not an upgrade: "+
					"the service's sockets were bound as uid %d, l4lb now runs as uid %d, and the kernel adds sockets to a SO_REUSEPORT group only for the user that bound it",
					sc.Name, len(adopted), sc.Workers, uid, euid)
			}
			if len(adopted) > sc.Workers {
				srv.log.Info("workers lowered: keeping the inherited sockets until a restart that is not an upgrade",
					"service", sc.Name, "sockets", len(adopted), "workers", sc.Workers)
			}
		} else if old != nil {
			need = sc.Workers - len(old.listeners)
			if uid := srv.geteuid(); need > 0 && uid != old.uid {
				// process.user: the sockets were bound before the switch.
				// Binding more would fail with EADDRINUSE, which would
				// not say why.
				undo()
				return change, fmt.Errorf("services.%s.workers: %d -> %d: with process.user, workers can be raised only at restart: "+
					"the service's sockets were bound as uid %d, l4lb now runs as uid %d, and the kernel adds sockets to a SO_REUSEPORT group only for the user that bound it",
					sc.Name, len(old.listeners), sc.Workers, old.uid, uid)
			}
		}
		if need <= 0 {
			continue
		}
		lns, err := listenTCP(ctx, sc.Listen, need)
		if err != nil {
			undo()
			return change, fmt.Errorf("services.%s.listen: %w", sc.Name, err)
		}
		if old != nil {
			extra[key] = lns
		} else {
			fresh[key] = append(fresh[key], lns...)
		}
	}
	srv.closeInherited()

	// Phase 2: publish. Only in-memory swaps from here on: nothing fails.
	summary := describeChange(srv.current, cfg)
	wanted := make(map[socketKey]bool, len(cfg.Services))
	var starting []startingService
	for i := range cfg.Services {
		sc := &cfg.Services[i]
		key := keyOf(sc)
		wanted[key] = true
		if rs := srv.retiringUDP[key]; rs != nil && srv.running[key] == nil {
			delete(srv.retiringUDP, key)
			if rs.udp.revive() {
				rs.cfg = sc
				rs.svc.Update(sc)
				srv.running[key] = rs
				srv.log.Info("service back while it drained: sockets and flows kept", "service", sc.Name, "listen", sc.Listen,
					"protocol", sc.Protocol, "backends", backendList(sc))
				continue
			}
			// Its drain closed the sockets just now: bind afresh. Nothing
			// else holds the address any more, so this can only fail as
			// any bind can; the service then stays down until the next
			// reload, and the error says so.
			conns, err := listener.ListenUDP(ctx, sc.Listen, sc.Workers)
			if err != nil {
				srv.log.Error("service could not come back", "service", sc.Name, "listen", sc.Listen, "error", err)
				continue
			}
			freshUDP[key] = conns
		}
		if conns, ok := freshUDP[key]; ok {
			rs := &runningService{svc: srv.newService(sc), cfg: sc}
			rs.udp = newUDPProxy(rs.svc, conns, srv.log.With("service", sc.Name))
			if inheritedUDP[key] && srv.udpHold != nil {
				rs.udp.held = srv.udpHold
			}
			srv.running[key] = rs
			srv.setLive(rs, true)
			starting = append(starting, startingService{rs, rs.udp.start, rs.udp.Close})
			continue
		}
		if lns, ok := fresh[key]; ok {
			uid, ok := freshUID[key]
			if !ok {
				uid = srv.geteuid()
			}
			rs := &runningService{svc: srv.newService(sc), cfg: sc, uid: uid, firstLoop: loops().reserve(len(lns))}
			srv.running[key] = rs
			srv.setLive(rs, true)
			starting = append(starting, startingService{rs, func() { srv.serve(rs, lns) }, func() { closeBound(lns) }})
			continue
		}
		rs := srv.running[key]
		if rs.cfg.Name != sc.Name {
			srv.log.Info("service renamed; sockets kept", "old", rs.cfg.Name, "new", sc.Name, "listen", sc.Listen)
		}
		rs.cfg = sc
		rs.svc.Update(sc)
		if rs.udp != nil && len(rs.udp.workers) != sc.Workers {
			srv.log.Info("workers of a udp service change at restart: resizing its SO_REUSEPORT group would re-hash clients to sockets whose flow tables do not know them",
				"service", sc.Name, "sockets", len(rs.udp.workers), "workers", sc.Workers)
		}
		if lns, ok := extra[key]; ok {
			srv.serve(rs, lns)
			srv.log.Info("workers added", "service", sc.Name, "workers", len(rs.listeners))
		} else if len(rs.listeners) > sc.Workers {
			srv.shrink(rs, sc.Workers)
		}
	}
	for key, rs := range srv.running {
		if !wanted[key] {
			srv.retire(rs)
			delete(srv.running, key)
		}
	}
	srv.start(ctx, starting)
	srv.current = cfg
	srv.version++
	srv.loaded = time.Now()
	change.Version = srv.version
	change.Summary = summary
	return change, nil
}

// startingService is a new service, bound and published, that does not
// yet take clients.
type startingService struct {
	rs    *runningService
	start func()
	// unbind closes the sockets of a service that is not to start.
	unbind func()
}

// start has the new services take clients. One with health checks first
// waits, for at most firstVerdictWait, until it can judge its clients
// (Service.judged): on a fresh start every backend is unknown, and a
// client accepted then would be closed for want of a checked backend,
// while a client kept in the kernel's accept queue a few milliseconds
// longer is served. The services wait side by side, each starting as soon
// as it is ready, so that one whose backends hang does not hold back the
// others. The wait holds mu, as the whole Apply does: it comes only with
// new services, and is bounded. It ends when ctx does: the services still
// waiting then are dropped, not started (drop).
func (srv *Server) start(ctx context.Context, starting []startingService) {
	began := time.Now()
	for len(starting) > 0 {
		if ctx.Err() != nil {
			for _, ss := range starting {
				srv.drop(ss)
			}
			return
		}
		waiting := starting[:0]
		for _, ss := range starting {
			if ss.rs.svc.judged() || time.Since(began) >= firstVerdictWait(ss.rs.cfg) {
				srv.startNow(ss, began)
			} else {
				waiting = append(waiting, ss)
			}
		}
		starting = waiting
		if len(starting) > 0 {
			time.Sleep(5 * time.Millisecond) // control side: polling is fine
		}
	}
}

// startNow has ss take clients and logs it.
func (srv *Server) startNow(ss startingService, began time.Time) {
	sc := ss.rs.cfg
	ss.start()
	ss.rs.svc.startedOnBackups()
	args := []any{"service", sc.Name, "listen", sc.Listen, "protocol", sc.Protocol,
		"balance", sc.Balance, "workers", sc.Workers}
	if sc.Protocol == config.UDP {
		args = append(args, "max_flows", sc.MaxFlows)
		if sc.RepliesPerDatagram > 0 {
			args = append(args, "replies_per_datagram", sc.RepliesPerDatagram)
		}
	}
	args = append(args, "backends", backendList(sc))
	if !checksOff(sc) {
		args = append(args, "healthy", ss.rs.svc.health.healthy.Load(),
			"waited_for_first_checks", time.Since(began).Round(time.Millisecond).String())
	}
	srv.log.Info("service started", args...)
}

// drop closes a service that was to start and must not: the stop began
// while it waited for its first checks. mu is held.
func (srv *Server) drop(ss startingService) {
	sc := ss.rs.cfg
	ss.unbind()
	ss.rs.svc.Drain(time.Now()) // ends its health checks; it has no client
	delete(srv.running, keyOf(sc))
	srv.setLive(ss.rs, false)
	srv.log.Info("service not started: stopping", "service", sc.Name, "listen", sc.Listen, "protocol", sc.Protocol)
}

// migrateSysctl is the kernel setting (Linux 5.14+) that moves connections
// queued on a closing SO_REUSEPORT socket to the others of its group
// instead of resetting them.
const migrateSysctl = "/proc/sys/net/ipv4/tcp_migrate_req"

// shrink lowers a service's socket count when that loses nothing: only if
// the kernel migrates queued connections on close. Otherwise the extra
// sockets keep serving until the next restart, which is always safe.
func (srv *Server) shrink(rs *runningService, workers int) {
	if v, err := os.ReadFile(migrateSysctl); err != nil || strings.TrimSpace(string(v)) != "1" {
		srv.log.Info("workers lowered: keeping the extra sockets until restart, since closing one would reset the connections queued on it (set net.ipv4.tcp_migrate_req=1 to allow it)",
			"service", rs.cfg.Name, "sockets", len(rs.listeners), "workers", workers)
		return
	}
	closeListeners(rs.listeners[workers:])
	rs.listeners = rs.listeners[:workers]
	srv.log.Info("workers removed", "service", rs.cfg.Name, "workers", workers)
}

// serve hands bound sockets to the event loops, each to the loop after the
// service's previous one, so that a service's SO_REUSEPORT group spreads
// over the cores; its first socket went to the loop after the previous
// service's last (loopSet.reserve), so that services spread too.
func (srv *Server) serve(rs *runningService, lns []boundSocket) {
	rs.listeners = append(rs.listeners, startAcceptors(loops(), rs.svc, srv.gate, lns, rs.firstLoop+len(rs.listeners), &rs.accepting)...)
}

// retire stops a service accepting and drains its connections in the
// background, for its drain_timeout.
func (srv *Server) retire(rs *runningService) {
	rs.stopAccepting()
	// The goroutine reads this config, not rs.cfg: a UDP service revived
	// by a later reload gets its new config while the goroutine ends.
	cfg := rs.cfg
	srv.log.Info("service removed: stopped accepting, draining", "service", cfg.Name, "listen", cfg.Listen,
		"drain_timeout", cfg.DrainTimeout.String())
	key := keyOf(cfg)
	if rs.udp != nil {
		srv.retiringUDP[key] = rs
	}
	srv.retiring.Add(1)
	go func() {
		defer srv.retiring.Done()
		deadline := time.Now().Add(cfg.DrainTimeout)
		var cutFlows int64
		if rs.udp != nil {
			// Sockets stay open while flows drain: replies leave by them.
			var drained bool
			if cutFlows, drained = rs.udp.Drain(deadline); !drained {
				return // revived by a reload: running again
			}
			srv.mu.Lock()
			if srv.retiringUDP[key] == rs {
				delete(srv.retiringUDP, key)
			}
			srv.mu.Unlock()
		}
		cut := rs.svc.Drain(deadline)
		srv.setLive(rs, false)
		srv.log.Info("service stopped", "service", cfg.Name, "listen", cfg.Listen,
			"closed_at_drain_timeout", cut, "flows_closed_at_drain_timeout", cutFlows)
	}()
}

// Shutdown stops accepting on every service, lets open connections finish
// for up to each service's drain_timeout, closes the rest and returns when
// every connection is closed, those of services that an earlier reload
// removed and that are still draining included. The services stay in
// Status and Services while they drain (Status says Stopping). A second
// call only waits for the services removed by reloads.
func (srv *Server) Shutdown() {
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		srv.retiring.Wait()
		return
	}
	srv.closed = true
	// Apply refuses to run from now on, so running is not changed again.
	running := srv.running
	srv.mu.Unlock()

	for _, rs := range running {
		rs.stopAccepting()
	}
	srv.log.Info("listeners closed")
	var wg sync.WaitGroup
	for _, rs := range running {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Say what the exit waits for: a UDP flow ends only when it
			// goes quiet, so one busy client holds the exit for the whole
			// drain_timeout.
			cfg := rs.cfg
			deadline := time.Now().Add(cfg.DrainTimeout)
			var conns, flows int64
			if rs.udp != nil {
				// A flow counts among its backend's connections too.
				flows = rs.udp.openFlows()
			} else {
				conns = rs.svc.openConnections()
			}
			if conns+flows > 0 {
				srv.log.Info("draining before exit", "service", cfg.Name, "connections", conns, "flows", flows,
					"drain_timeout", cfg.DrainTimeout.String())
			}
			var cut, cutFlows int64
			if rs.udp != nil {
				cutFlows, _ = rs.udp.Drain(deadline)
				rs.svc.Drain(deadline) // the flows are closed: nothing left to cut
			} else {
				cut = rs.svc.Drain(deadline)
			}
			if cut+cutFlows > 0 {
				srv.log.Info("drain_timeout passed: closed what was still open", "service", cfg.Name,
					"connections", cut, "flows", cutFlows)
			}
		}()
	}
	wg.Wait()
	// Services removed by a reload keep their own drain deadlines, which a
	// shutdown does not cut short.
	srv.retiring.Wait()
}

// setLive adds rs to the services OpenConnections counts, or removes it
// once it has drained.
func (srv *Server) setLive(rs *runningService, live bool) {
	srv.liveMu.Lock()
	defer srv.liveMu.Unlock()
	if live {
		srv.live[rs] = struct{}{}
	} else {
		delete(srv.live, rs)
	}
}

// OpenConnections counts what a stop that does not wait closes: the TCP
// connections open over every service, those still reading their PROXY
// header and those of services a reload removed that still drain
// included, and the UDP flows. Unlike Status, it does not wait for an
// Apply in progress (which holds mu while new services wait for their
// first checks).
func (srv *Server) OpenConnections() (conns, flows int64) {
	srv.liveMu.Lock()
	live := make([]*runningService, 0, len(srv.live))
	for rs := range srv.live {
		live = append(live, rs)
	}
	srv.liveMu.Unlock()
	for _, rs := range live {
		if rs.udp != nil {
			// A flow counts among its backend's connections too.
			flows += rs.udp.openFlows()
		} else {
			conns += rs.svc.openConnections()
		}
	}
	return conns, flows
}

// Version returns the running config's version (1 for the first, +1 per
// applied change) and the config itself.
func (srv *Server) Version() (uint64, *config.Config, time.Time) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.version, srv.current, srv.loaded
}

// Services returns the running services, for status views.
func (srv *Server) Services() []*Service {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	out := make([]*Service, 0, len(srv.running))
	for _, rs := range srv.running {
		out = append(out, rs.svc)
	}
	return out
}

// boundSocket is a listening socket bound by Apply's first phase, not yet
// accepting.
type boundSocket struct {
	fd   int
	addr netip.AddrPort
}

// listenTCP binds n SO_REUSEPORT sockets to addr and takes them off Go's
// netpoller for the event loops.
func listenTCP(ctx context.Context, addr netip.AddrPort, n int) ([]boundSocket, error) {
	lns, err := listener.ListenTCP(ctx, addr, n)
	if err != nil {
		return nil, err
	}
	out := make([]boundSocket, 0, n)
	for i, ln := range lns {
		bound := ln.Addr().(*net.TCPAddr).AddrPort()
		fd, err := listener.Detach(ln)
		if err != nil {
			closeBound(out)
			for _, ln := range lns[i:] {
				ln.Close()
			}
			return nil, err
		}
		out = append(out, boundSocket{fd, bound})
	}
	return out, nil
}

func closeBound(lns []boundSocket) {
	for _, b := range lns {
		unix.Close(b.fd)
	}
}

// startAcceptors hands lns to the event loops of set for svc, lns[i] to
// the loop of index first+i (modulo the loop count), and counts each in
// running until its loop has closed it.
func startAcceptors(set *loopSet, svc *Service, gate *connGate, lns []boundSocket, first int, running *sync.WaitGroup) []*acceptor {
	out := make([]*acceptor, 0, len(lns))
	for i, b := range lns {
		l := set.loops[(first+i)%len(set.loops)]
		a := &acceptor{loop: l, fd: b.fd, listenFD: b.fd, addr: b.addr, svc: svc, gate: gate, held: listener.Conn{FD: -1}, done: running}
		running.Add(1)
		l.postAcceptor(a, false)
		out = append(out, a)
	}
	return out
}

// closeListeners has the loops close lns; their done counts say when.
func closeListeners(lns []*acceptor) {
	for _, a := range lns {
		a.loop.postAcceptor(a, true)
	}
}

func backendList(sc *config.Service) []string {
	out := make([]string, len(sc.Backends))
	for i, b := range sc.Backends {
		out[i] = fmt.Sprintf("%s(w=%d)", b.Address, b.Weight)
		if b.Backup {
			out[i] = fmt.Sprintf("%s(w=%d,backup)", b.Address, b.Weight)
		}
	}
	return out
}

// describeChange summarises the difference between two configs in one
// line: services added (+), removed (-), and per service the backends
// added, removed and reweighted.
func describeChange(old, cfg *config.Config) string {
	if old == nil {
		return fmt.Sprintf("initial config, %d services", len(cfg.Services))
	}
	var parts []string
	for i := range cfg.Services {
		sc := &cfg.Services[i]
		prev := old.Service(sc.Name)
		if prev == nil {
			parts = append(parts, "+service "+sc.Name)
			continue
		}
		if d := describeServiceChange(prev, sc); d != "" {
			parts = append(parts, sc.Name+": "+d)
		}
	}
	for i := range old.Services {
		if cfg.Service(old.Services[i].Name) == nil {
			parts = append(parts, "-service "+old.Services[i].Name)
		}
	}
	parts = append(parts, describeSettingsChange(old, cfg)...)
	if len(parts) == 0 {
		return "no change (formatting or comments)"
	}
	return strings.Join(parts, "; ")
}

// describeSettingsChange lists the changed settings outside services, and
// says which of them wait for a restart.
func describeSettingsChange(old, cfg *config.Config) []string {
	settings := []struct {
		key, was, now string
		atRestart     bool
	}{
		{"admin.listen", old.Admin.Listen, cfg.Admin.Listen, false},
		{"reload.watch", strconv.FormatBool(old.Reload.Watch), strconv.FormatBool(cfg.Reload.Watch), false},
		{"log.level", old.Log.Level, cfg.Log.Level, false},
		{"log.connections", strconv.FormatBool(old.Log.Connections), strconv.FormatBool(cfg.Log.Connections), false},
		{"log.format", old.Log.Format, cfg.Log.Format, true},
		{"process.user", old.Process.User, cfg.Process.User, true},
		{"process.group", old.Process.Group, cfg.Process.Group, true},
	}
	var parts []string
	for _, st := range settings {
		if st.was == st.now {
			continue
		}
		part := fmt.Sprintf("%s %q -> %q", st.key, st.was, st.now)
		if st.atRestart {
			part += " (takes effect at restart)"
		}
		parts = append(parts, part)
	}
	return parts
}

func describeServiceChange(prev, sc *config.Service) string {
	var parts []string
	before := make(map[netip.AddrPort]config.Backend, len(prev.Backends))
	for _, b := range prev.Backends {
		before[b.Address] = b
	}
	for _, b := range sc.Backends {
		was, ok := before[b.Address]
		switch {
		case !ok:
			parts = append(parts, fmt.Sprintf("+%s", b.Address))
		case was.Weight != b.Weight:
			parts = append(parts, fmt.Sprintf("~%s weight %d→%d", b.Address, was.Weight, b.Weight))
		}
		if ok && was.MaxConnections != b.MaxConnections {
			parts = append(parts, fmt.Sprintf("~%s max_connections %d→%d", b.Address, was.MaxConnections, b.MaxConnections))
		}
		if ok && was.Backup != b.Backup {
			// Applied at the swap like a weight: Update rebuilds the route
			// from the whole config on every reload.
			parts = append(parts, fmt.Sprintf("~%s backup %t→%t", b.Address, was.Backup, b.Backup))
		}
		delete(before, b.Address)
	}
	for _, b := range prev.Backends {
		if _, gone := before[b.Address]; gone {
			parts = append(parts, fmt.Sprintf("-%s", b.Address))
		}
	}
	if prev.Protocol != sc.Protocol {
		parts = append(parts, fmt.Sprintf("protocol %s→%s", prev.Protocol, sc.Protocol))
	}
	if prev.Listen != sc.Listen {
		parts = append(parts, fmt.Sprintf("listen %s→%s", prev.Listen, sc.Listen))
	}
	if prev.Workers != sc.Workers {
		parts = append(parts, fmt.Sprintf("workers %d→%d", prev.Workers, sc.Workers))
	}
	if prev.Balance != sc.Balance || prev.HashKey != sc.HashKey || prev.ConnectTimeout != sc.ConnectTimeout ||
		prev.IdleTimeout != sc.IdleTimeout || prev.DrainTimeout != sc.DrainTimeout {
		parts = append(parts, "settings")
	}
	if prev.Health != sc.Health || prev.PassiveFall != sc.PassiveFall ||
		prev.PanicMode != sc.PanicMode || prev.OnDown != sc.OnDown || prev.OnFailback != sc.OnFailback {
		parts = append(parts, "health")
	}
	if prev.MaxFlows != sc.MaxFlows {
		parts = append(parts, fmt.Sprintf("max_flows %d→%d", prev.MaxFlows, sc.MaxFlows))
	}
	if prev.RepliesPerDatagram != sc.RepliesPerDatagram {
		// Flows open at the reload keep the count they opened with.
		parts = append(parts, "replies_per_datagram")
	}
	if protectionChanged(prev, sc) {
		parts = append(parts, "protection")
	}
	return strings.Join(parts, " ")
}
