package l4

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// checkedConfig is a service over backends with fast TCP connect checks.
func checkedConfig(backends ...netip.AddrPort) *config.Service {
	cfg := &config.Service{
		Name: "test", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: config.TCP,
		Balance: config.Maglev, HashKey: config.SourceIPPort, Workers: 1,
		ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: time.Second,
		Health:      config.Health{Kind: config.HealthTCP, Interval: 50 * time.Millisecond, Timeout: 40 * time.Millisecond, Rise: 2, Fall: 2},
		PassiveFall: 3, PanicMode: config.PanicNone, OnDown: config.OnDownKeep,
	}
	for _, b := range backends {
		cfg.Backends = append(cfg.Backends, config.Backend{Address: b, Weight: 1})
	}
	return cfg
}

func newCheckedService(t *testing.T, cfg *config.Service) *Service {
	t.Helper()
	s := NewService(cfg, hclog.NewNullLogger())
	t.Cleanup(func() { s.Drain(time.Now()) })
	return s
}

// routed returns the addresses in the service's current route.
func routed(s *Service) []netip.AddrPort {
	var out []netip.AddrPort
	for _, be := range s.route.Load().backends {
		out = append(out, be.addr)
	}
	return out
}

func backendOf(s *Service, addr netip.AddrPort) *Backend {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.backends[addr]
}

// eventually polls cond every 5 ms for up to 5 s: health changes have no
// signal of their own that a unit test could wait on.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after 5s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func sameAddrs(got []netip.AddrPort, want ...netip.AddrPort) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}

// closedAddr is a loopback address where nothing listens.
func closedAddr(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

// restartable is a loopback backend that can stop listening and listen
// again on the same port; serve runs each connection.
type restartable struct {
	t     *testing.T
	addr  netip.AddrPort
	ln    net.Listener
	serve func(net.Conn)
}

// newRestartable is a restartable echo backend.
func newRestartable(t *testing.T) *restartable {
	return newRestartableServing(t, func(c net.Conn) {
		io.Copy(c, c)
		c.Close()
	})
}

func newRestartableServing(t *testing.T, serve func(net.Conn)) *restartable {
	r := &restartable{t: t, addr: closedAddr(t), serve: serve}
	r.start()
	t.Cleanup(func() { r.stop() })
	return r
}

func (r *restartable) start() {
	ln, err := net.Listen("tcp", r.addr.String())
	if err != nil {
		r.t.Fatal(err)
	}
	r.ln = ln
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go r.serve(c)
		}
	}()
}

func (r *restartable) stop() {
	if r.ln != nil {
		r.ln.Close()
		r.ln = nil
	}
}

func TestHealthRouteFollowsChecks(t *testing.T) {
	live := newRestartable(t)
	dead := closedAddr(t)
	s := newCheckedService(t, checkedConfig(live.addr, dead))
	if got := routed(s); len(got) != 0 {
		t.Fatalf("route %v before any probe: new backends must wait for their first success", got)
	}
	eventually(t, "live backend routed", func() bool { return sameAddrs(routed(s), live.addr) })
	eventually(t, "dead backend down", func() bool { return backendOf(s, dead).health.tracker.State() == health.Down })
	if got := backendOf(s, live.addr).Health().Status.State; got != health.Up {
		t.Errorf("live backend is %v", got)
	}

	live.stop()
	eventually(t, "route empty once the live backend stopped", func() bool { return len(routed(s)) == 0 })
	snap := backendOf(s, live.addr).Health()
	if last := snap.History[len(snap.History)-1]; last.From != health.Up || last.To != health.Down || !strings.Contains(last.Reason, "2 consecutive probes failed") {
		t.Errorf("last transition %+v", last)
	}
	if got := s.HealthRebuilds(); got < 2 {
		t.Errorf("%d rebuilds, want at least 2 (up, then down)", got)
	}

	// All down: the first backend to answer comes back at its first
	// success, not after rise (2) of them.
	cfg := checkedConfig(live.addr, dead)
	cfg.Health.Rise = 50
	s.Update(cfg)
	live.start()
	eventually(t, "live backend routed again with rise 50", func() bool { return sameAddrs(routed(s), live.addr) })
}

func TestHealthCoalescesRebuilds(t *testing.T) {
	var addrs []netip.AddrPort
	for range 5 {
		addrs = append(addrs, startEcho(t))
	}
	cfg := checkedConfig(addrs...)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second // one probe each, then quiet
	s := newCheckedService(t, cfg)
	eventually(t, "all 5 up", func() bool { return len(routed(s)) == 5 })
	time.Sleep(2 * rebuildDelay)
	before := s.HealthRebuilds()

	// Five changes within a few microseconds: one rebuild.
	for _, a := range addrs[:4] {
		be := backendOf(s, a)
		tr, _ := be.health.tracker.Force(health.Down, "test")
		s.health.transition(cfg, be, tr, true)
	}
	eventually(t, "route shrunk to one backend", func() bool { return len(routed(s)) == 1 })
	time.Sleep(2 * rebuildDelay)
	if got := s.HealthRebuilds() - before; got != 1 {
		t.Errorf("4 changes at once caused %d rebuilds, want 1", got)
	}
}

// TestHealthMaglevKeysStay checks that a backend going down moves only the
// keys that were on it.
func TestHealthMaglevKeysStay(t *testing.T) {
	var addrs []netip.AddrPort
	for range 4 {
		addrs = append(addrs, startEcho(t))
	}
	cfg := checkedConfig(addrs...)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second
	s := newCheckedService(t, cfg)
	eventually(t, "all up", func() bool { return len(routed(s)) == 4 })
	pick := func(key uint64) netip.AddrPort {
		r := s.route.Load()
		return r.backends[r.balancer.pick(key, nil)].addr
	}
	before := make(map[uint64]netip.AddrPort)
	for k := range uint64(2000) {
		before[k*0x9e3779b97f4a7c15] = pick(k * 0x9e3779b97f4a7c15)
	}
	be := backendOf(s, addrs[2])
	tr, _ := be.health.tracker.Force(health.Down, "test")
	s.health.transition(cfg, be, tr, true)
	eventually(t, "3 routed", func() bool { return len(routed(s)) == 3 })
	// Maglev moves a few slots of other backends too (about 1% of the
	// table, see TestMaglevDisruption); a rebuild that reshuffled the
	// table would move most of them.
	moved, others := 0, 0
	for k, was := range before {
		if was == addrs[2] {
			if pick(k) == addrs[2] {
				t.Fatalf("key %x still goes to the backend that is down", k)
			}
			continue
		}
		others++
		if pick(k) != was {
			moved++
		}
	}
	if moved*100 > others*3 {
		t.Errorf("%d of %d keys of backends still up moved, want under 3%%", moved, others)
	}
	t.Logf("%d of %d keys of backends still up moved", moved, others)
}

func TestHealthPassive(t *testing.T) {
	live := newRestartable(t)
	other := startEcho(t)
	cfg := checkedConfig(live.addr, other)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second // only the first probe
	s := newCheckedService(t, cfg)
	eventually(t, "both up", func() bool { return len(routed(s)) == 2 })
	be := backendOf(s, live.addr)

	// Two failures, a success, two failures: never three in a row.
	fail := func() { s.connectFailed(cfg, be, net.ErrClosed) }
	fail()
	fail()
	connectOK(be)
	fail()
	fail()
	if st := be.health.tracker.State(); st != health.Up {
		t.Fatalf("after failures interrupted by a success: %v, want up", st)
	}
	fail() // the third in a row
	if st := be.health.tracker.State(); st != health.Down {
		t.Fatalf("after passive_fall failures in a row: %v, want down", st)
	}
	snap := be.Health()
	if r := snap.History[len(snap.History)-1].Reason; !strings.Contains(r, "passive: 3 connects in a row failed") {
		t.Errorf("reason %q", r)
	}
	eventually(t, "route without the backend", func() bool { return sameAddrs(routed(s), other) })

	// The active check brings it back after rise successes.
	cfg2 := *cfg
	cfg2.Health.Interval, cfg2.Health.Timeout = 50*time.Millisecond, 40*time.Millisecond
	s.Update(&cfg2)
	eventually(t, "backend back", func() bool { return len(routed(s)) == 2 })
	if n := be.health.passiveFails.Load(); n != 0 {
		t.Errorf("passive count %d after coming back, want 0", n)
	}
}

// A reload that lowers passive_fall below a run of failed connects in
// progress keeps passive detection working: the next failure, past the new
// passive_fall, marks the backend down.
func TestHealthPassiveFallLoweredByReload(t *testing.T) {
	a, b := startEcho(t), startEcho(t)
	cfg := checkedConfig(a, b)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second // only the first probe
	cfg.PassiveFall = 5
	s := newCheckedService(t, cfg)
	eventually(t, "both up", func() bool { return len(routed(s)) == 2 })
	be := backendOf(s, a)
	for range 4 {
		s.connectFailed(cfg, be, errConnectTimeout)
	}
	lowered := *cfg
	lowered.PassiveFall = 3
	s.Update(&lowered)
	s.connectFailed(&lowered, be, errConnectTimeout)
	if st := be.health.tracker.State(); st != health.Down {
		t.Fatalf("5 connects in a row failed, passive_fall lowered to 3: backend %v, want down", st)
	}
	snap := be.Health()
	if r := snap.History[len(snap.History)-1].Reason; !strings.Contains(r, "passive: 5 connects in a row failed") {
		t.Errorf("reason %q; want the run's real length", r)
	}
}

// A backend passive detection took down shows that as its last failure
// (what `l4lb status` prints under the table), not an older probe failure.
func TestHealthPassiveDownIsLastFailure(t *testing.T) {
	check := newRestartable(t)
	backend := startEcho(t)
	cfg := checkedConfig(backend)
	cfg.Health.Port = check.addr.Port()
	cfg.Health.Fall = 100 // a few failed probes leave it up
	s := newCheckedService(t, cfg)
	eventually(t, "backend up", func() bool { return len(routed(s)) == 1 })
	be := backendOf(s, backend)
	check.stop()
	eventually(t, "a probe failed", func() bool { return be.Health().LastFailure != "" })
	check.start()
	eventually(t, "probes pass again", func() bool { return be.Health().Status.Streak == 0 })
	for range cfg.PassiveFall {
		s.connectFailed(cfg, be, errConnectTimeout)
	}
	if got := be.Health().LastFailure; !strings.HasPrefix(got, "passive: 3 connects in a row failed") {
		t.Errorf("down by passive detection; last failure %q, want the passive reason", got)
	}
}

func TestHealthPassiveFromDataPath(t *testing.T) {
	live := newRestartable(t)
	other := startEcho(t)
	cfg := checkedConfig(live.addr, other)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second
	s := newCheckedService(t, cfg)
	eventually(t, "both up", func() bool { return len(routed(s)) == 2 })
	live.stop()
	r := s.route.Load()
	for i := 0; live.ln == nil && backendOf(s, live.addr).health.tracker.State() == health.Up && i < 1000; i++ {
		// Keys whose first choice is the stopped backend: each connect
		// fails on it and then succeeds on the other.
		key := uint64(i) * 0x9e3779b97f4a7c15
		if r.backends[r.balancer.pick(key, nil)].addr != live.addr {
			continue
		}
		s.dialAndCount(r, key)
	}
	if st := backendOf(s, live.addr).health.tracker.State(); st != health.Down {
		t.Fatalf("backend refusing connects is %v, want down by passive detection", st)
	}
}

// dialAndCount runs connect's dial loop for key without a client socket.
func (s *Service) dialAndCount(r *route, key uint64) {
	var tried []int
	for len(tried) < maxDialAttempts {
		i := r.balancer.pick(key, tried)
		if i < 0 {
			return
		}
		tried = append(tried, i)
		be := r.backends[i]
		c, err := net.DialTimeout("tcp", be.addr.String(), time.Second)
		if err == nil {
			connectOK(be)
			c.Close()
			return
		}
		s.connectFailed(r.cfg, be, err)
	}
}

func TestHealthPanicMode(t *testing.T) {
	a, b := startEcho(t), startEcho(t)
	for _, mode := range []config.PanicMode{config.PanicNone, config.PanicAll} {
		t.Run(string(mode), func(t *testing.T) {
			cfg := checkedConfig(a, b)
			cfg.Health.Port = closedAddr(t).Port() // every check fails
			cfg.PanicMode = mode
			s := newCheckedService(t, cfg)
			eventually(t, "both down", func() bool {
				return backendOf(s, a).health.tracker.State() == health.Down && backendOf(s, b).health.tracker.State() == health.Down
			})
			time.Sleep(2 * rebuildDelay)
			got := routed(s)
			switch {
			case mode == config.PanicNone && len(got) != 0:
				t.Errorf("panic_mode none with all down: route %v, want empty", got)
			case mode == config.PanicAll && len(got) != 2:
				t.Errorf("panic_mode all with all down: route %v, want both", got)
			}
			if s.route.Load().panicking != (mode == config.PanicAll) {
				t.Errorf("panicking = %v", s.route.Load().panicking)
			}
		})
	}
}

func TestHealthOnDown(t *testing.T) {
	for _, onDown := range []config.OnDown{config.OnDownKeep, config.OnDownClose} {
		t.Run(string(onDown), func(t *testing.T) {
			backend := startEcho(t)
			check := newRestartable(t) // the check port, separate from traffic
			cfg := checkedConfig(backend)
			cfg.Health.Port = check.addr.Port()
			cfg.OnDown = onDown
			addr, s := startService(t, time.Minute)
			s.Update(cfg)
			// The checks probe 127.0.0.1:check port for the backend.
			eventually(t, "backend up", func() bool { return len(routed(s)) == 1 })
			c, err := net.Dial("tcp", addr.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			roundTrip(t, c, "before")

			check.stop()
			eventually(t, "backend down", func() bool { return len(routed(s)) == 0 })
			time.Sleep(2 * rebuildDelay)
			if onDown == config.OnDownKeep {
				roundTrip(t, c, "after down")
				return
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := c.Read(make([]byte, 1)); err == nil {
				t.Fatalf("read %d bytes on a connection to a backend marked down with on_down close", n)
			} else if !isReset(err) && err != io.EOF {
				t.Fatalf("read: %v; want EOF or reset", err)
			}
		})
	}
}

// A passive mark-down does not apply on_down = "close": three connects in
// a row that time out (a full accept queue for a moment) say nothing of
// the connections already open to a backend whose checks pass, and must
// not cut them.
func TestHealthPassiveDownKeepsSessions(t *testing.T) {
	backend := startEcho(t)
	cfg := checkedConfig(backend)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second // one probe, at the start
	cfg.OnDown = config.OnDownClose
	addr, s := startService(t, time.Minute)
	s.Update(cfg)
	eventually(t, "backend up", func() bool { return len(routed(s)) == 1 })
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "before")
	be := backendOf(s, backend)
	for range cfg.PassiveFall {
		s.connectFailed(cfg, be, errConnectTimeout)
	}
	if st := be.health.tracker.State(); st != health.Down {
		t.Fatalf("after passive_fall connect timeouts: %v, want down", st)
	}
	eventually(t, "backend out of the route", func() bool { return len(routed(s)) == 0 })
	time.Sleep(2 * rebuildDelay) // a close would have come with the rebuild
	roundTrip(t, c, "after the passive mark-down")
}

// Once the checks find a backend that passive detection took down failing
// too (fall probes in a row), on_down = "close" closes its connections, as
// if the checks had marked it down: a dead backend the data path noticed
// first must not keep its clients.
func TestHealthChecksConfirmPassiveDown(t *testing.T) {
	backend := startEcho(t)
	check := newRestartable(t) // the check port, separate from traffic
	cfg := checkedConfig(backend)
	cfg.Health.Port = check.addr.Port()
	cfg.OnDown = config.OnDownClose
	addr, s := startService(t, time.Minute)
	s.Update(cfg)
	eventually(t, "backend up", func() bool { return len(routed(s)) == 1 })
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "before")
	be := backendOf(s, backend)
	check.stop() // the next probes fail; fall of them take a while
	for range cfg.PassiveFall {
		s.connectFailed(cfg, be, errConnectTimeout)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes on a connection to a backend whose checks fail, with on_down close", n)
	} else if !isReset(err) && err != io.EOF {
		t.Fatalf("read: %v; want EOF or reset", err)
	}
	snap := be.Health()
	if r := snap.History[len(snap.History)-1].Reason; !strings.Contains(r, "passive") {
		t.Errorf("last transition %q: want the passive mark-down (the checks only confirmed it)", r)
	}
}

// TestHealthSurvivesReload checks that an Update keeps the health of the
// backends that stay: they stay routed, and a new one waits for its probe.
func TestHealthSurvivesReload(t *testing.T) {
	a, b := startEcho(t), startEcho(t)
	cfg := checkedConfig(a)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second
	s := newCheckedService(t, cfg)
	eventually(t, "a up", func() bool { return sameAddrs(routed(s), a) })
	s.Update(checkedConfig(a, b))
	if got := routed(s); !sameAddrs(got, a) {
		t.Errorf("right after the reload: route %v, want only %s (b is not probed yet)", got, a)
	}
	eventually(t, "b up", func() bool { return len(routed(s)) == 2 })

	// Checks off: everything routed at once, and turning them back on
	// starts from up.
	none := checkedConfig(a, b, closedAddr(t))
	none.Health = config.Health{Kind: config.HealthNone}
	none.PassiveFall = 0
	s.Update(none)
	if got := routed(s); len(got) != 3 {
		t.Errorf("checks off: route %v, want all 3", got)
	}
}

// A fresh start with health checks: a client that connects as soon as the
// socket is bound, before any backend has been probed, waits in the accept
// queue and is served, instead of being closed for want of a checked
// backend (as every restart did to its first clients).
func TestFreshServiceWaitsForFirstChecks(t *testing.T) {
	// The backend answers every connection, its probes' too, after 150 ms:
	// no probe can pass before the client below connects.
	slow := startBackend(t, func(c net.Conn) {
		time.Sleep(150 * time.Millisecond)
		echo(c)
	})
	// An address of this test's own in 127/8: no other test holds it.
	var listen = ownAddr("127.88.3.1:7000")
	cfg, err := config.Parse([]byte(fmt.Sprintf(`[services.db]
listen = %q
  [services.db.health]
  kind = "send_expect"
  send = "ping"
  expect = "ping"
  interval = "10s"
  timeout = "2s"
  [[services.db.backends]]
  address = %q
`, listen, slow)), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	c, applied := applyAndDial(t, cfg, listen)
	roundTrip(t, c, "the first client")
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
}

// New services wait for their first checks side by side: one whose only
// backend never answers its probe does not hold back another whose
// backend answers at once.
func TestNewServicesWaitSideBySide(t *testing.T) {
	hang := startBackend(t, func(c net.Conn) {
		defer c.Close()
		time.Sleep(5 * time.Second) // never answers the probe in time
	})
	echo := startEcho(t)
	// Addresses of this test's own in 127/8: no other test holds them.
	var hangListen, fineListen = ownAddr("127.88.9.1:7000"), ownAddr("127.88.9.2:7000")
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[services.a_hangs]
listen = %q
  [services.a_hangs.health]
  kind = "send_expect"
  send = "ping"
  expect = "pong"
  interval = "10s"
  timeout = "1500ms"
  [[services.a_hangs.backends]]
  address = %q

[services.b_fine]
listen = %q
  [services.b_fine.health]
  kind = "tcp"
  interval = "10s"
  timeout = "1500ms"
  [[services.b_fine.backends]]
  address = %q
`, hangListen, hang, fineListen, echo)), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	c, applied := applyAndDial(t, cfg, fineListen)
	roundTrip(t, c, "b_fine's first client")
	// Apply returns once a_hangs gives up waiting, 1.5 s after its first
	// probe began: b_fine must have served before that, not after.
	select {
	case err := <-applied:
		t.Errorf("b_fine served its first client only once a_hangs had stopped waiting for its checks (Apply: %v)", err)
	default:
		if err := <-applied; err != nil {
			t.Fatal(err)
		}
	}
}

// applyAndDial applies cfg on a new Server while it dials listen, from
// before the socket is bound: once bound, the kernel queues the client.
// Apply's result comes on the channel.
func applyAndDial(t *testing.T, cfg *config.Config, listen string) (net.Conn, <-chan error) {
	t.Helper()
	srv := NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	return applyAndDialOn(t, srv, cfg, listen)
}

// applyAndDialOn is applyAndDial on srv.
func applyAndDialOn(t *testing.T, srv *Server, cfg *config.Config, listen string) (net.Conn, <-chan error) {
	t.Helper()
	applied := make(chan error, 1)
	go func() {
		_, err := srv.Apply(context.Background(), cfg)
		applied <- err
	}()
	for attempt := 0; ; attempt++ {
		c, err := net.Dial("tcp", listen)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c, applied
		}
		if attempt == 5000 {
			t.Fatalf("%s never listened: %v", listen, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// A reload that swaps a checked service's whole pool (blue for green)
// keeps the blue backend taking new clients until green's first check
// answers, then moves them to green: no client is turned away in between.
// Swapping the primaries beside a healthy backup goes the same way: the
// backup takes none of those clients.
func TestReloadSwappingPoolKeepsServing(t *testing.T) {
	for _, tt := range []struct {
		name string
		// listen is an address of this case's own in 127/8: no other test
		// holds it.
		listen     string
		withBackup bool
	}{
		{"primaries only", "127.88.7.1:7000", false},
		{"beside a backup", "127.88.11.1:7000", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			blue, backup := startEcho(t), startEcho(t)
			// Green answers every connection, its probe's too, after 150 ms: no
			// probe can pass before the client below connects.
			green := startBackend(t, func(c net.Conn) {
				time.Sleep(150 * time.Millisecond)
				echo(c)
			})
			var listen = ownAddr(tt.listen)
			text := func(primary netip.AddrPort) string {
				s := fmt.Sprintf(`[services.db]
listen = %q
  [services.db.health]
  kind = "tcp"
  interval = "10s"
  timeout = "2s"
  [[services.db.backends]]
  address = %q
`, listen, primary)
				if tt.withBackup {
					s += fmt.Sprintf("  [[services.db.backends]]\n  address = %q\n  backup = true\n", backup)
				}
				return s
			}
			srv, logs := loggedServer(t, text(blue))
			t.Cleanup(srv.Shutdown)
			svc := srv.Services()[0]
			if tt.withBackup {
				eventually(t, "backup up", isUp(svc, backup))
			}
			cfg, err := config.Parse([]byte(text(green)), "test.toml")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := srv.Apply(context.Background(), cfg); err != nil {
				t.Fatal(err)
			}
			c, err := net.Dial("tcp", listen)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			roundTrip(t, c, "the first client after the swap")
			if n := svc.refused.Load(); n != 0 {
				t.Errorf("%d clients refused during the swap", n)
			}
			if be := backendOf(svc, backup); be != nil && be.total.Load() != 0 {
				t.Errorf("the backup took %d clients while the new primary's first check was due", be.total.Load())
			}
			wantLog(t, logs, "the previous ones take new clients until the first checks answer")
			eventually(t, "green routed alone", func() bool { return sameAddrs(routed(svc), green) })
			eventually(t, "blue retired once idle", func() bool { return backendOf(svc, blue) == nil })
		})
	}
}

// With panic_mode = "all" a fresh start still waits for the first checks,
// instead of starting on a panic route over backends nobody probed, and
// warns of no outage: none was found.
func TestPanicAllStartWaitsForFirstChecks(t *testing.T) {
	good := startEcho(t)
	// An address of this test's own in 127/8: no other test holds it.
	var listen = ownAddr("127.88.7.2:7000")
	srv, logs := loggedServer(t, fmt.Sprintf(`[services.db]
listen = %q
panic_mode = "all"
  [services.db.health]
  kind = "tcp"
  interval = "10s"
  timeout = "1s"
  [[services.db.backends]]
  address = %q
  [[services.db.backends]]
  address = %q
`, listen, good, closedAddr(t)))
	t.Cleanup(srv.Shutdown)
	if got := routed(srv.Services()[0]); !sameAddrs(got, good) {
		svc := srv.Services()[0]
		t.Errorf("route once started: %v, want only the backend whose check passed, %s (panicking %v, healthy %d)\n%s", got, good, svc.route.Load().panicking, svc.health.healthy.Load(), logs.String())
	}
	if strings.Contains(logs.String(), "no healthy backend") {
		t.Errorf("a fresh start warned of an outage:\n%s", logs.String())
	}
}

// The wait for a new pool's first checks is bounded: swapped for a pool
// whose checks fail, the service follows its config once they have
// answered, and the previous backend drains.
func TestReloadToDeadPoolEndsWait(t *testing.T) {
	blue := startEcho(t)
	s := newCheckedService(t, checkedConfig(blue))
	eventually(t, "blue up", func() bool { return sameAddrs(routed(s), blue) })
	dead := checkedConfig(closedAddr(t))
	dead.Health.Fall = 3 // the first failed probe leaves it unknown: no transition rebuilds
	s.Update(dead)
	if got := routed(s); !sameAddrs(got, blue) {
		t.Errorf("right after the swap: route %v, want blue %s until the new backend is checked", got, blue)
	}
	eventually(t, "the route empty once the wait ends", func() bool { return len(routed(s)) == 0 })
	eventually(t, "blue retired", func() bool { return backendOf(s, blue) == nil })
}

// on_down = "close" reaches a connect in flight: the close sweeps the
// backend's open connections once, when its checks mark it down, and a
// connect that completes after that must not be proxied to the backend
// marked down; the key's next backend takes the client.
func TestOnDownCloseReachesConnectInFlight(t *testing.T) {
	slow := newSlowBackend(t) // its connects hang until released, and it never answers
	other := startEcho(t)
	check := newRestartable(t)
	cfg := checkedConfig(slow.addr, other)
	cfg.Balance = config.RoundRobin // the first client goes to the first backend
	cfg.Health.Port = check.addr.Port()
	cfg.Health.Interval = time.Hour // probed once, at the start
	cfg.OnDown = config.OnDownClose
	cfg.ConnectTimeout = 10 * time.Second
	addr, s := startService(t, time.Minute)
	s.Update(cfg)
	eventually(t, "both up", func() bool { return len(routed(s)) == 2 })

	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	be := backendOf(s, slow.addr)
	eventually(t, "the connect to the slow backend in flight", func() bool { return be.active.Load() == 1 })
	if tr, changed := be.health.tracker.Force(health.Down, "marked down by the test"); changed {
		s.health.transition(cfg, be, tr, true)
	}
	eventually(t, "the slow backend out of the route", func() bool { return sameAddrs(routed(s), other) })
	slow.release(t)
	roundTrip(t, c, "served by the backend still up")
}

// TestHealthProbesSendProxyHeader checks TCP services against backends
// that, like nginx's `listen ... proxy_protocol` or HAProxy's accept-proxy,
// serve nothing to a connection without a PROXY header: with
// proxy_protocol set and no health.port, probes send a v1 UNKNOWN or v2
// LOCAL header first, so send_expect passes, and a connect check does not
// leave the backend a headerless connection.
func TestHealthProbesSendProxyHeader(t *testing.T) {
	tests := []struct {
		name string
		pp   config.ProxyProtocol
		kind config.HealthKind
	}{
		{"v1 send_expect", config.ProxyV1, config.HealthSendExpect},
		{"v2 send_expect", config.ProxyV2, config.HealthSendExpect},
		{"v1 tcp", config.ProxyV1, config.HealthTCP},
		{"v2 tcp", config.ProxyV2, config.HealthTCP},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			headers := make(chan proxyHeader, 100)
			backend := startBackend(t, func(c net.Conn) {
				defer c.Close()
				h, err := readProxyHeader(c.(*net.TCPConn), time.Now().Add(5*time.Second))
				if err != nil {
					return // no header, no service
				}
				select {
				case headers <- h:
				default:
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if req, _ := bufio.NewReader(c).ReadString('\n'); req == "PING\r\n" {
					io.WriteString(c, "+PONG\r\n")
				}
			})
			cfg := checkedConfig(backend)
			cfg.Protect.ProxyProtocol = tt.pp
			cfg.Health.Kind = tt.kind
			if tt.kind == config.HealthSendExpect {
				cfg.Health.Send, cfg.Health.Expect = "PING\r\n", "+PONG"
			}
			s := newCheckedService(t, cfg)
			select {
			case h := <-headers:
				if !h.local {
					t.Errorf("probe sent header %+v; want v1 UNKNOWN or v2 LOCAL (the balancer's own connection)", h)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("no probe sent a PROXY header in 5s; last failure %q", backendOf(s, backend).Health().LastFailure)
			}
			eventually(t, "backend up", func() bool { return len(routed(s)) == 1 })
		})
	}
}

// TestHealthUDPProbeSendsProxyHeader checks a UDP service with
// proxy_protocol = "v2" against a backend that, like nginx's UDP listeners
// with proxy_protocol, drops every datagram that does not start with a
// header: the probe datagram starts with a v2 LOCAL header, then send.
func TestHealthUDPProbeSendsProxyHeader(t *testing.T) {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, udpBufSize)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if h, size, err := parseProxyHeader(buf[:n]); err == nil && h.local && string(buf[size:n]) == "ping" {
				c.WriteToUDPAddrPort([]byte("pong"), from)
			}
		}
	}()
	backend := c.LocalAddr().(*net.UDPAddr).AddrPort()
	cfg := udpConfig(backend)
	cfg.Protect.ProxyProtocol = config.ProxyV2
	cfg.Health = config.Health{Kind: config.HealthSendExpect, Interval: 50 * time.Millisecond, Timeout: 40 * time.Millisecond,
		Rise: 2, Fall: 2, Send: "ping", Expect: "pong"}
	s := newCheckedService(t, cfg)
	eventually(t, "backend up", func() bool { return len(routed(s)) == 1 })
}

// TestHealthSpecProxyHeader checks when probes carry a PROXY header: only
// when they reach the listener the data path does (the service's protocol,
// the backend's own port), which is when the backend expects one.
func TestHealthSpecProxyHeader(t *testing.T) {
	v1Local, v2Local := "PROXY UNKNOWN\r\n", string(proxyV2Sig)+"\x20\x00\x00\x00"
	tests := []struct {
		name     string
		protocol config.Protocol
		kind     config.HealthKind
		pp       config.ProxyProtocol
		port     uint16
		want     string
	}{
		{"tcp, none", config.TCP, config.HealthTCP, config.ProxyNone, 0, ""},
		{"tcp, v1", config.TCP, config.HealthTCP, config.ProxyV1, 0, v1Local},
		{"send_expect, v2", config.TCP, config.HealthSendExpect, config.ProxyV2, 0, v2Local},
		{"check port elsewhere", config.TCP, config.HealthSendExpect, config.ProxyV1, 8080, ""},
		{"udp send_expect, v2", config.UDP, config.HealthSendExpect, config.ProxyV2, 0, v2Local},
		{"udp service, tcp connect check", config.UDP, config.HealthTCP, config.ProxyV2, 0, ""},
		{"udp send_expect, check port elsewhere", config.UDP, config.HealthSendExpect, config.ProxyV2, 8080, ""},
	}
	for _, tt := range tests {
		cfg := &config.Service{Protocol: tt.protocol, Health: config.Health{Kind: tt.kind, Port: tt.port, Expect: "x"}}
		cfg.Protect.ProxyProtocol = tt.pp
		if got := healthSpec(cfg).ProxyHeader; got != tt.want {
			t.Errorf("%s: probe header %q, want %q", tt.name, got, tt.want)
		}
	}
}

// A probe result that arrives after checks were turned off (a probe that
// was in flight) is dropped: judged with the checks-off config (fall 0) it
// would take a backend down, and checks turned back on would start it
// from down.
func TestHealthLateProbeAfterChecksOff(t *testing.T) {
	a, b := startEcho(t), startEcho(t)
	cfg := checkedConfig(a, b)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second // only the first probe
	s := newCheckedService(t, cfg)
	eventually(t, "both up", func() bool { return len(routed(s)) == 2 })
	be := backendOf(s, a)
	obs := be.health.observer
	off := *cfg
	off.Health = config.Health{Kind: config.HealthNone}
	off.PassiveFall = 0
	s.Update(&off)
	obs.Observe(health.Result{Err: errConnectTimeout}) // the late result
	if st := be.health.tracker.State(); st != health.Up {
		t.Errorf("one failed probe result after checks were turned off: backend %v, want up", st)
	}
}

// A service that never had checks records no health transition for its
// backends (none in the status history, none in the transition metrics):
// they are up by assumption. Turning checks off on a backend they had
// taken down is a transition, and is recorded.
func TestHealthUncheckedServiceRecordsNoTransition(t *testing.T) {
	live := startEcho(t)
	dead := closedAddr(t)
	cfg := checkedConfig(live, dead)
	cfg.Health = config.Health{Kind: config.HealthNone}
	cfg.PassiveFall = 0
	s := newCheckedService(t, cfg)
	for _, addr := range []netip.AddrPort{live, dead} {
		snap := backendOf(s, addr).Health()
		if snap.Status.State != health.Up || snap.WentUp != 0 || len(snap.History) != 0 {
			t.Errorf("%v of a service that never had checks: %v, transitions to up %d, history %+v; want up with none",
				addr, snap.Status.State, snap.WentUp, snap.History)
		}
	}

	checked := checkedConfig(live, dead)
	s.Update(checked)
	eventually(t, "the dead backend down", func() bool { return backendOf(s, dead).Health().Status.State == health.Down })
	s.Update(cfg)
	snap := backendOf(s, dead).Health()
	if snap.Status.State != health.Up || len(snap.History) != 2 || snap.History[1].Reason != "health checks turned off" {
		t.Errorf("checks turned off on a backend they took down: %v, history %+v; want up, recorded", snap.Status.State, snap.History)
	}
}

// A run of failed connects from before checks were turned off does not
// count once they are back on: one failed connect is not passive_fall.
func TestHealthChecksOffResetsPassiveRun(t *testing.T) {
	a, b := startEcho(t), startEcho(t)
	cfg := checkedConfig(a, b)
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second
	s := newCheckedService(t, cfg)
	eventually(t, "both up", func() bool { return len(routed(s)) == 2 })
	be := backendOf(s, a)
	for range cfg.PassiveFall {
		s.connectFailed(cfg, be, errConnectTimeout)
	}
	if be.health.tracker.State() != health.Down {
		t.Fatal("passive detection did not mark it down")
	}
	off := *cfg
	off.Health = config.Health{Kind: config.HealthNone}
	off.PassiveFall = 0
	s.Update(&off)
	if be.health.tracker.State() != health.Up {
		t.Fatal("checks off: not forced up")
	}
	on := *cfg
	s.Update(&on)
	s.connectFailed(&on, be, errConnectTimeout)
	if st := be.health.tracker.State(); st != health.Up {
		t.Errorf("one failed connect after checks came back took the backend %v (passive_fall %d); reason %q",
			st, on.PassiveFall, be.Health().LastFailure)
	}
}
