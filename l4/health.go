package l4

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// This file is how a Service learns which backends can take traffic.
//
// Each Backend carries a health.Tracker (so its state survives reloads,
// keyed by address like the rest of Backend). Two things feed it: the
// service's health.Checker, which probes every configured backend and hands
// the results to a healthObserver, and the data path, which counts failed
// connects (passive detection) and forces the backend down after
// passive_fall of them in a row (on_down = "close" acts on that only once
// the checks find the backend failing too). Either way a state change
// schedules one route rebuild; the changes of the next rebuildDelay join
// it, so a rack going dark costs one table build, not one per backend.
//
// The route holds only backends with weight > 0 that are up (or every
// backend, when checks are off), and of those the primaries, or with no
// primary up, the backups (backup = true). With none up, new connections
// are closed at once, unless panic_mode = "all" routes them to all
// weighted backends, backups included.

// rebuildDelay is how long a health change waits for others to join its
// rebuild. Short against any probe interval, long against the few
// milliseconds in which a switch or rack failure reports all its backends.
const rebuildDelay = 100 * time.Millisecond

// backendHealth is the health state a Backend carries across reloads.
type backendHealth struct {
	tracker health.Tracker
	// passiveFails counts connects in a row that failed, as seen by every
	// core's data path; a successful connect or an up transition resets it.
	passiveFails atomic.Int32
	// closePending is set when the checks mark the backend down under
	// on_down = "close": the next rebuild, once the backend is out of the
	// route, closes its connections.
	closePending atomic.Bool
	// passiveDown is set while the backend is down by passive detection
	// and the checks have not found it failing; downProbeFails counts the
	// failed probes in a row since. on_down = "close" waits for fall of
	// them (see confirmPassiveDown).
	passiveDown    atomic.Bool
	downProbeFails atomic.Int32
	// observer is the backend's health.Observer, made once so that the
	// checker sees the same target on every Set and keeps its prober
	// running. Guarded by the owning Service's mu.
	observer *healthObserver
}

// serviceHealth is a Service's side of health checking.
type serviceHealth struct {
	log     hclog.Logger
	checker *health.Checker
	// rebuild republishes the route from the current config and health,
	// then closes what on_down = "close" asks for. It takes the owner's
	// lock, so it runs from a timer, never under serviceHealth's mu.
	rebuild func()
	cfg     atomic.Pointer[config.Service] // the latest config synced

	mu sync.Mutex // guards timer and closed
	// timer is the pending coalesced rebuild, nil when none is pending.
	timer  *time.Timer
	closed bool

	// healthy is the number of routed backends that passed their checks in
	// the route last built; 0 means all down (or none checked yet).
	healthy atomic.Int32
	// outageLogged: the panic warning is logged and its end is not;
	// backupsLogged: the warning that no primary is usable is logged and
	// the return to primaries is not. Guarded by the owner's lock.
	outageLogged  bool
	backupsLogged bool
	rebuilds      atomic.Uint64 // route rebuilds caused by health changes
}

func (h *serviceHealth) init(log hclog.Logger, rebuild func()) {
	h.log = log
	h.checker = health.NewChecker(log)
	h.rebuild = rebuild
}

// close stops the probers and any pending rebuild. It returns once no
// observer runs any more; a service being drained needs neither.
func (h *serviceHealth) close() {
	h.mu.Lock()
	h.closed = true
	if h.timer != nil {
		h.timer.Stop()
		h.timer = nil
	}
	h.mu.Unlock()
	h.checker.Close()
}

// checksOff reports whether cfg probes nothing. The zero Kind counts as
// none, for configs built in code rather than loaded.
func checksOff(cfg *config.Service) bool {
	return cfg.Health.Kind == config.HealthNone || cfg.Health.Kind == ""
}

// usable reports whether be may be in the route under cfg's checks.
func usable(cfg *config.Service, be *Backend) bool {
	return checksOff(cfg) || be.health.tracker.State() == health.Up
}

// standby is a weighted backend the checks keep out of the route, and the
// member it would be.
type standby struct {
	be *Backend
	m  member
}

// tier is the weighted backends of one kind, primaries or backups: the
// usable ones (backends, and members parallel to it) and those the checks
// or passive detection keep out (down).
type tier struct {
	backends []*Backend
	members  []member
	down     []standby
}

// awaited are the backends whose first checks a reload that leaves no
// primary usable waits for (keepPreviousRoute): the primaries the checks
// keep out, and the backups too when none of them is usable either. A
// reload that brings new primaries must not send new clients to a standby
// for the moment their first probes take.
func awaited(primaries, backups tier) []standby {
	if len(backups.members) > 0 {
		return primaries.down
	}
	return append(slices.Clip(primaries.down), backups.down...)
}

// choose picks the route's members: the usable primaries; with none, the
// usable backups (onBackups); with neither and panic_mode = "all", every
// weighted backend, backups included. A primary at weight 0 is not
// usable, so a pool whose primaries are all in maintenance routes to its
// backups. The owner's lock is held.
func (h *serviceHealth) choose(cfg *config.Service, primaries, backups tier) (_ []*Backend, _ []member, panicking, onBackups bool) {
	var chosen tier
	switch {
	case len(primaries.members) > 0:
		chosen = primaries
	case len(backups.members) > 0:
		chosen, onBackups = backups, true
	}
	backends, members := chosen.backends, chosen.members
	h.healthy.Store(int32(len(members)))
	down := append(slices.Clip(primaries.down), backups.down...)
	panicking = len(members) == 0 && len(down) > 0 && cfg.PanicMode == config.PanicAll
	if panicking {
		for _, sb := range down {
			backends = append(backends, sb.be)
			members = append(members, sb.m)
		}
	}
	// Before the first checks answer every backend is unknown and the
	// route panics, but nothing failed: an outage is told only once a
	// check found one.
	outage := panicking && slices.ContainsFunc(down, func(sb standby) bool { return sb.be.health.tracker.Probed() })
	if outage != h.outageLogged {
		h.outageLogged = outage
		if outage {
			h.log.Warn("no healthy backend: panic_mode = \"all\" routes to every weighted backend", "service", cfg.Name, "backends", len(members))
		} else {
			h.log.Info("panic mode over: routing to healthy backends only", "service", cfg.Name)
		}
	}
	// Likewise the backups: a backup answering its first probe before the
	// primaries do is no primary failing. A pool with no weighted primary
	// (all in maintenance) has nothing to wait for.
	primariesGone := onBackups && (len(primaries.down) == 0 ||
		slices.ContainsFunc(primaries.down, func(sb standby) bool { return sb.be.health.tracker.Probed() }))
	if primariesGone {
		h.warnOnBackups(cfg, len(members), len(primaries.down))
	} else if h.backupsLogged && len(primaries.members) > 0 {
		// Told only on the way back to primaries: the backups failing
		// too is told by their transitions and the refusals (or panic).
		h.backupsLogged = false
		h.log.Info("primary backend usable again: routing to primaries", "service", cfg.Name, "primaries", len(primaries.members))
	}
	return backends, members, panicking, onBackups
}

// failedBack reports whether next moves new connections from the backups
// back to the primaries: prev, or the last route with a balancer before
// it, was on the backups. A route out of panic mode is no failback, even
// when the panic routed to backups too: they served then as every other
// backend did, not as the standby of a failed primary.
func failedBack(prev, next *route) bool {
	return prev != nil && prev.backupsLast && next.balancer != nil && !next.backups && !next.panicking
}

// closeBackupsLocked closes, under on_failback = "close", the connections
// open on the backups once next routes to the primaries again: clients of
// a database standby must reconnect to the primary rather than go on
// writing to the standby beside them. The backups are cfg's weighted
// ones, and those prev routed to that next does not (removed or set to
// weight 0 by the reload that brought the primaries back; their drain
// would leave them writing for drain_timeout). A backup at weight 0
// before the failback drains as it was. Called after next is published,
// as rebuildForHealth closes a backend marked down: no new connection
// reaches the backups meanwhile. s.mu is held.
func (s *Service) closeBackupsLocked(cfg *config.Service, prev, next *route) {
	var backups []*Backend
	for _, b := range cfg.Backends {
		if b.Backup && b.Weight > 0 {
			backups = append(backups, s.backends[b.Address])
		}
	}
	for _, be := range prev.backends {
		if !slices.Contains(next.backends, be) && !slices.Contains(backups, be) {
			backups = append(backups, be)
		}
	}
	var open int64
	for _, be := range backups {
		open += be.active.Load()
		be.closeConns()
	}
	if open > 0 {
		s.log.Info(fmt.Sprintf("failback: closing %d connections on backups", open), "service", cfg.Name,
			"connections", open, "on_failback", string(cfg.OnFailback))
	}
}

// warnOnBackups warns that new connections go to the backups, once per
// stay on them. The owner's lock is held.
func (h *serviceHealth) warnOnBackups(cfg *config.Service, backups, primariesDown int) {
	if h.backupsLogged {
		return
	}
	h.backupsLogged = true
	h.log.Warn(fmt.Sprintf("no usable primary backend: routing to %d backups", backups), "service", cfg.Name,
		"backups", backups, "primaries_down", primariesDown)
}

// sync points the checker at cfg's backends. The owner's lock is held, so
// observers are made and read safely; backends maps address to state.
func (h *serviceHealth) sync(cfg *config.Service, backends map[netip.AddrPort]*Backend) {
	h.mu.Lock()
	closed := h.closed
	h.mu.Unlock()
	if closed {
		return
	}
	h.cfg.Store(cfg)
	if checksOff(cfg) {
		// No checks: every backend is up, so that turning checks on later
		// starts from up instead of taking the pool out of service until
		// the first probes. The probers stop first: once Set returns, no
		// late result of theirs can take a backend down again. A backend
		// never judged (a service that never had checks) is up by
		// assumption: no transition is recorded, counted or logged.
		h.checker.Set(nil)
		for _, be := range backends {
			// As for any mark-up: a run of failed connects from before
			// must not count once checks are back.
			be.health.passiveFails.Store(0)
			be.health.passiveDown.Store(false)
			be.health.closePending.Store(false)
			if be.health.tracker.SetInitial(health.Up) {
				continue
			}
			if tr, changed := be.health.tracker.Force(health.Up, "health checks turned off"); changed {
				h.logTransition(cfg, be, tr)
			}
		}
		return
	}
	spec := healthSpec(cfg)
	targets := make([]health.Target, 0, len(cfg.Backends))
	for _, b := range cfg.Backends {
		be := backends[b.Address]
		if be.health.observer == nil {
			be.health.observer = &healthObserver{h: h, be: be}
		}
		addr := b.Address
		if cfg.Health.Port != 0 {
			addr = netip.AddrPortFrom(addr.Addr(), cfg.Health.Port)
		}
		targets = append(targets, health.Target{Key: b.Address.String(), Addr: addr, Spec: spec, Observer: be.health.observer})
	}
	if err := h.checker.Set(targets); err != nil {
		// The config package validates every spec; this is a bug.
		h.log.Error("health checks not started", "service", cfg.Name, "error", err)
	}
}

// healthSpec translates a service's [health] table for the checker:
// send_expect goes over the service's own protocol.
//
// A probe that reaches the listener the data path does (the service's own
// protocol, no health.port) carries the PROXY header first when the
// service sends one, as HAProxy's checks do on a server with send-proxy
// and no check port: a backend that requires the header would otherwise
// drop every probe, and be marked down while the data path works. The
// header is v1 UNKNOWN or v2 LOCAL, which the backend takes as the
// balancer's own connection. Elsewhere (health.port, or a TCP connect
// check of a UDP service) the probe reaches another listener, whose
// needs l4lb does not know: it sends none.
func healthSpec(cfg *config.Service) health.Spec {
	hc := cfg.Health
	spec := health.Spec{
		Kind: health.Connect, Network: "tcp",
		Interval: hc.Interval, Timeout: hc.Timeout, Rise: hc.Rise, Fall: hc.Fall,
	}
	if hc.Kind == config.HealthSendExpect {
		spec.Kind = health.SendExpect
		spec.Network = string(cfg.Protocol)
		spec.Send, spec.Expect, spec.ExpectRegex = hc.Send, hc.Expect, hc.ExpectRegex
	}
	if pp := cfg.Protect.ProxyProtocol; pp != config.ProxyNone && pp != "" && hc.Port == 0 && spec.Network == string(cfg.Protocol) {
		spec.ProxyHeader = string(appendProxyLocalHeader(nil, pp))
	}
	return spec
}

// healthObserver applies one backend's probe results.
type healthObserver struct {
	h  *serviceHealth
	be *Backend
}

var _ health.Observer = (*healthObserver)(nil)

func (o *healthObserver) Observe(res health.Result) {
	cfg := o.h.cfg.Load()
	if checksOff(cfg) {
		// A result of checks since turned off: sync stops the probers
		// before forcing every backend up, so none should come; judged
		// with fall 0 it would take the backend down.
		return
	}
	rise := cfg.Health.Rise
	if o.h.healthy.Load() == 0 {
		// Nothing serves: the first backend to answer takes traffic at
		// once. Waiting for rise confirmations would only prolong the
		// outage; with others up, rise guards against flapping as usual.
		rise = 1
	}
	if tr, changed := o.be.health.tracker.Observe(res.Err == nil, rise, cfg.Health.Fall, res.Detail()); changed {
		o.h.transition(cfg, o.be, tr, true)
		return
	}
	o.confirmPassiveDown(cfg, res.Err == nil)
}

// confirmPassiveDown counts the probes of a backend that passive detection
// took down. fall failures in a row are the checks finding it down, as if
// they had marked it down themselves: on_down = "close" then closes its
// connections. Without this, a dead backend that the data path noticed
// first would keep its clients for good.
func (o *healthObserver) confirmPassiveDown(cfg *config.Service, ok bool) {
	bh := &o.be.health
	if !bh.passiveDown.Load() {
		return
	}
	if ok {
		bh.downProbeFails.Store(0)
		return
	}
	if int(bh.downProbeFails.Add(1)) < max(cfg.Health.Fall, 1) || !bh.passiveDown.CompareAndSwap(true, false) {
		return
	}
	if cfg.OnDown == config.OnDownClose && bh.tracker.State() == health.Down {
		bh.closePending.Store(true)
		o.h.schedule(false)
	}
}

// transition logs a state change of be and schedules the rebuild. byChecks
// is false for a mark-down by passive detection, which on_down = "close"
// does not act on until the checks agree (confirmPassiveDown): failed
// connects say that new connections fail, perhaps only for a moment (a
// full accept queue), not that the open ones are dead.
func (h *serviceHealth) transition(cfg *config.Service, be *Backend, tr health.Transition, byChecks bool) {
	h.logTransition(cfg, be, tr)
	switch tr.To {
	case health.Up:
		be.health.passiveFails.Store(0)
		be.health.closePending.Store(false)
		be.health.passiveDown.Store(false)
	case health.Down:
		be.health.downProbeFails.Store(0)
		be.health.passiveDown.Store(!byChecks)
		if byChecks && cfg.OnDown == config.OnDownClose {
			be.health.closePending.Store(true)
		}
	}
	h.schedule(tr.To == health.Up)
}

func (h *serviceHealth) logTransition(cfg *config.Service, be *Backend, tr health.Transition) {
	h.log.Info("backend health changed", "service", cfg.Name, "backend", be.addr,
		"from", tr.From.String(), "to", tr.To.String(), "reason", tr.Reason)
}

// schedule arranges one rebuild rebuildDelay from now, unless one is
// pending already: the changes until then share it. When nothing serves
// (no healthy backend in the route, as at start) a backend coming up is
// routed at once instead: waiting would only prolong the outage.
func (h *serviceHealth) schedule(up bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return
	}
	if up && h.healthy.Load() == 0 {
		if h.timer != nil && !h.timer.Stop() {
			return // firing already: it will see this change
		}
		h.timer = nil
		go h.rebuild()
		return
	}
	if h.timer != nil {
		return
	}
	h.timer = time.AfterFunc(rebuildDelay, func() {
		h.mu.Lock()
		h.timer = nil
		closed := h.closed
		h.mu.Unlock()
		if !closed {
			h.rebuild()
		}
	})
}

// rebuildForHealth republishes the route with the backends' current
// health, then closes the connections of backends that went down under
// on_down = "close". They are closed after the swap, so that no new
// connection reaches them meanwhile.
func (s *Service) rebuildForHealth() {
	s.mu.Lock()
	s.rebuildLocked()
	cfg := s.cfg
	backends := make([]*Backend, 0, len(s.backends))
	for _, be := range s.backends {
		backends = append(backends, be)
	}
	s.mu.Unlock()

	n := s.health.rebuilds.Add(1)
	r := s.route.Load()
	s.log.Info("routing table rebuilt after health change", "service", cfg.Name,
		"healthy", s.health.healthy.Load(), "backends", len(cfg.Backends), "panic", r.panicking, "backups", r.backups, "rebuilds_total", n)
	if r.panicking {
		return // down backends are routed to: their connections are all there is
	}
	for _, be := range backends {
		if !be.health.closePending.Swap(false) || be.health.tracker.State() == health.Up {
			continue
		}
		open := be.active.Load()
		be.closeConns()
		s.log.Info("closed the connections of a backend marked down (on_down = \"close\")", "service", cfg.Name,
			"backend", be.addr, "connections", open)
	}
}

// connectFailed counts a failed connect to be: passive_fall of them in a
// row, on any cores, mark it down until its checks bring it back. Its open
// connections stay, even under on_down = "close", unless the checks find
// it failing too (confirmPassiveDown).
func (s *Service) connectFailed(cfg *config.Service, be *Backend, err error) {
	if cfg.PassiveFall == 0 {
		return
	}
	// At or past passive_fall, not only at it: a reload may lower
	// passive_fall below a run in progress. Force reports the change to
	// one goroutine only.
	n := be.health.passiveFails.Add(1)
	if int(n) < cfg.PassiveFall || be.health.tracker.State() == health.Down {
		return
	}
	reason := fmt.Sprintf("passive: %d connects in a row failed, last: %v", n, err)
	if tr, changed := be.health.tracker.Force(health.Down, reason); changed {
		s.health.transition(cfg, be, tr, false)
	}
}

// connectOK resets be's run of failed connects. It writes only when there
// is a run, so that the common case leaves the counter's cache line
// shared between cores.
func connectOK(be *Backend) {
	if be.health.passiveFails.Load() != 0 {
		be.health.passiveFails.Store(0)
	}
}

// noRouteReason says why a route has no backend at all, for the refusal
// log line.
func noRouteReason(cfg *config.Service) string {
	for _, b := range cfg.Backends {
		if b.Weight > 0 {
			return "no healthy backend"
		}
	}
	return "no backend with weight > 0"
}

// Health is the backend's health state, for status views.
func (b *Backend) Health() health.Snapshot { return b.health.tracker.Snapshot() }

// HealthRebuilds is how many times health changes rebuilt the service's
// routing table.
func (s *Service) HealthRebuilds() uint64 { return s.health.rebuilds.Load() }

// firstVerdictWait bounds how long a new service with health checks waits
// for its first probe results before it accepts: the first probe starts
// within health.FirstProbeSpread and fails or succeeds within the check's
// timeout; the margin covers the route's rebuild. A long timeout is capped:
// the wait holds the Server's lock, which status and reloads need.
func firstVerdictWait(cfg *config.Service) time.Duration {
	if checksOff(cfg) {
		return 0
	}
	return health.FirstProbeSpread + min(cfg.Health.Timeout, maxFirstCheckWait) + 50*time.Millisecond
}

const maxFirstCheckWait = 2 * time.Second

// keepPreviousRoute reports whether a rebuild leaves the previous route
// published: no backend of the new one is up, some are not probed yet
// (a reload brought them), and the previous route has healthy backends
// to offer.
// New clients then go to the previous backends until the new ones' first
// checks answer, for at most firstVerdictWait, as a fresh start waits for
// them: a reload that swaps a whole pool must not turn clients away.
// s.mu is held.
func (s *Service) keepPreviousRoute(cfg *config.Service, down []standby) bool {
	prev := s.route.Load()
	unprobed := slices.ContainsFunc(down, func(sb standby) bool { return !sb.be.health.tracker.Probed() })
	if prev == nil || prev.balancer == nil || prev.panicking || !unprobed {
		return false
	}
	now := time.Now()
	if s.firstChecksDue.IsZero() {
		wait := firstVerdictWait(cfg)
		s.firstChecksDue = now.Add(wait)
		timer := time.AfterFunc(wait, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.firstChecksTimer != nil {
				s.rebuildLocked()
				// A new primary whose first probe is still out (a timeout
				// above the wait's 2 s) left the new route on the
				// backups, and only its failing fall probes would tell.
				s.warnIfOnBackupsLocked()
			}
		})
		s.firstChecksTimer = timer
		s.log.Info("no new backend checked yet: the previous ones take new clients until the first checks answer",
			"service", cfg.Name, "at_most", wait.String())
		return true
	}
	return now.Before(s.firstChecksDue)
}

// stopFirstChecksWait ends keepPreviousRoute's wait, as a route is
// published. s.mu is held.
func (s *Service) stopFirstChecksWait() {
	if s.firstChecksTimer != nil {
		s.firstChecksTimer.Stop()
		s.firstChecksTimer = nil
	}
	s.firstChecksDue = time.Time{}
}

// startedOnBackups warns, as the service starts taking clients, that they
// go to its backups, if choose held the warning back while a primary was
// not probed yet: the start ends once every primary has answered, but a
// first probe that fails (fall > 1) leaves its primary unknown and
// rebuilds nothing, so no later choose would warn until fall probes
// had failed.
func (s *Service) startedOnBackups() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.warnIfOnBackupsLocked()
}

// warnIfOnBackupsLocked warns, once per stay, when the published route is on
// the backups. s.mu is held.
func (s *Service) warnIfOnBackupsLocked() {
	r := s.route.Load()
	if !r.backups {
		return
	}
	primariesDown := 0
	for _, b := range s.cfg.Backends {
		if !b.Backup && b.Weight > 0 {
			primariesDown++
		}
	}
	s.health.warnOnBackups(s.cfg, len(r.backends), primariesDown)
}

// judged reports whether the published route can take clients, or every
// weighted backend has been probed and none is up. A panic_mode = "all"
// route made before the first checks answer holds backends nobody has
// probed: it counts only once they are. So does a route on the backups,
// once every weighted primary has been probed and none is up: a start
// must not send its first clients to a standby only because the standby
// answered its first probe before the primaries did.
func (s *Service) judged() bool {
	r := s.route.Load()
	if r.balancer != nil && !r.panicking && !r.backups {
		return true
	}
	s.mu.Lock()
	weighted := make([]*Backend, 0, len(s.cfg.Backends))
	for _, b := range s.cfg.Backends {
		if be := s.backends[b.Address]; b.Weight > 0 && be != nil && !(r.backups && b.Backup) {
			weighted = append(weighted, be)
		}
	}
	s.mu.Unlock()
	// The trackers' locks are taken outside s.mu, as Status does.
	for _, be := range weighted {
		// Up but not yet routed: the rebuild is on its way.
		if !be.health.tracker.Probed() || be.health.tracker.State() == health.Up {
			return false
		}
	}
	return true
}
