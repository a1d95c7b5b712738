package l4

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// Backup backends (backup = true): they take new connections only while no
// primary is usable. These tests run real services over loopback backends
// judged by real health checks.

// namedBackend is a restartable loopback TCP backend that greets each
// connection with its name and a newline, then echoes, so that a client
// knows who served it.
type namedBackend struct {
	*restartable
	name string
}

func newNamedBackend(t *testing.T, name string) *namedBackend {
	return &namedBackend{name: name, restartable: newRestartableServing(t, func(c net.Conn) {
		if _, err := fmt.Fprintf(c, "%s\n", name); err != nil {
			c.Close() // a health probe, gone already
			return
		}
		echo(c)
	})}
}

// dialNamed connects to a service of named backends and returns the name
// of the one that served, and the connection, open until the test ends.
func dialNamed(t *testing.T, addr netip.AddrPort) (string, net.Conn) {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	// Byte by byte: a bufio.Reader could keep bytes the echo sends later.
	var name strings.Builder
	buf := make([]byte, 1)
	for {
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("no greeting from a backend: %v (after %q)", err, name.String())
		}
		if buf[0] == '\n' {
			return name.String(), c
		}
		name.WriteByte(buf[0])
	}
}

// servedBy dials n clients and counts them by the backend that served.
func servedBy(t *testing.T, addr netip.AddrPort, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		name, c := dialNamed(t, addr)
		got[name]++
		c.Close()
	}
	return got
}

// loggedService runs cfg on loopback with a log the test reads.
func loggedService(t *testing.T, cfg *config.Service) (netip.AddrPort, *Service, *lockedBuffer) {
	t.Helper()
	logs := new(lockedBuffer)
	s := NewService(cfg, hclog.New(&hclog.LoggerOptions{Output: logs}))
	return serveTest(t, s, cfg.Listen), s, logs
}

func isUp(s *Service, addr netip.AddrPort) func() bool {
	return func() bool { return backendOf(s, addr).health.tracker.State() == health.Up }
}

// statusOf returns the status of the backend at addr.
func statusOf(t *testing.T, st ServiceStatus, addr netip.AddrPort) BackendStatus {
	t.Helper()
	for _, b := range st.Backends {
		if b.Address == addr {
			return b
		}
	}
	t.Fatalf("no backend %s in the status", addr)
	return BackendStatus{}
}

// The backup takes nothing while a primary is up; with every primary
// down the backup takes the new connections; a primary back takes them
// again, and the connection open on the backup goes on, not drained.
func TestBackupServesOnlyWithoutPrimaries(t *testing.T) {
	p1, p2 := newNamedBackend(t, "p1"), newNamedBackend(t, "p2")
	b := newNamedBackend(t, "b")
	cfg := checkedConfig(p1.addr, p2.addr, b.addr)
	cfg.Backends[2].Backup = true
	addr, s, logs := loggedService(t, cfg)
	eventually(t, "backup up", isUp(s, b.addr))
	eventually(t, "primaries routed", func() bool { return sameAddrs(routed(s), p1.addr, p2.addr) })
	if got := servedBy(t, addr, 30); got["b"] != 0 || got["p1"] == 0 || got["p2"] == 0 {
		t.Errorf("30 clients with both primaries up: %v; want both primaries and not the backup", got)
	}
	st := s.Status()
	if st.RoutingToBackups || !statusOf(t, st, b.addr).Backup || statusOf(t, st, b.addr).InRoute || statusOf(t, st, p1.addr).Backup {
		t.Errorf("status with primaries up: routing to backups %v, backup %+v", st.RoutingToBackups, statusOf(t, st, b.addr))
	}

	p1.stop()
	p2.stop()
	eventually(t, "the backup routed alone", func() bool { return sameAddrs(routed(s), b.addr) })
	name, onBackup := dialNamed(t, addr)
	if name != "b" {
		t.Fatalf("client with every primary down served by %q, want the backup", name)
	}
	roundTrip(t, onBackup, "on the backup")
	if st := s.Status(); !st.RoutingToBackups || !statusOf(t, st, b.addr).InRoute {
		t.Errorf("status with every primary down: routing to backups %v, backup %+v", st.RoutingToBackups, statusOf(t, st, b.addr))
	}
	wantLog(t, logs, "no usable primary backend: routing to 1 backups")

	p1.start()
	eventually(t, "the primary back in the route", func() bool { return sameAddrs(routed(s), p1.addr) })
	if got := servedBy(t, addr, 10); got["p1"] != 10 {
		t.Errorf("10 clients with a primary back: %v; want all on p1", got)
	}
	roundTrip(t, onBackup, "still on the backup")
	st = s.Status()
	if be := statusOf(t, st, b.addr); st.RoutingToBackups || be.InRoute || be.Draining || be.Active != 1 {
		t.Errorf("status with a primary back: routing to backups %v, backup %+v; want out of the route, not draining, its connection open",
			st.RoutingToBackups, be)
	}
	wantLog(t, logs, "primary backend usable again: routing to primaries")
}

// Every primary at weight 0 (maintenance) sends new connections to the
// backups at the reload's swap, and backup itself changes at the swap,
// like a weight.
func TestBackupReloads(t *testing.T) {
	p, b := newNamedBackend(t, "p"), newNamedBackend(t, "b")
	cfg := checkedConfig(p.addr, b.addr)
	cfg.Backends[1].Backup = true
	addr, s, logs := loggedService(t, cfg)
	eventually(t, "backup up", isUp(s, b.addr))
	eventually(t, "the primary routed", func() bool { return sameAddrs(routed(s), p.addr) })
	name, onPrimary := dialNamed(t, addr)
	if name != "p" {
		t.Fatalf("first client served by %q, want the primary", name)
	}

	reload := func(edit func(bs []config.Backend)) {
		next := *cfg
		next.Backends = append([]config.Backend(nil), cfg.Backends...)
		edit(next.Backends)
		s.Update(&next)
	}
	reload(func(bs []config.Backend) { bs[0].Weight = 0 })
	if got := routed(s); !sameAddrs(got, b.addr) || !s.route.Load().backups {
		t.Fatalf("right after the reload setting the primary to weight 0: route %v (on backups %v), want the backup", got, s.route.Load().backups)
	}
	if got := servedBy(t, addr, 10); got["b"] != 10 {
		t.Errorf("10 clients with the primary at weight 0: %v; want all on the backup", got)
	}
	roundTrip(t, onPrimary, "on the primary at weight 0, draining")
	wantLog(t, logs, "no usable primary backend: routing to 1 backups")

	reload(func(bs []config.Backend) { bs[1].Backup = false })
	if got := routed(s); !sameAddrs(got, p.addr, b.addr) || s.route.Load().backups {
		t.Errorf("right after the reload making the backup a primary: route %v, want both", got)
	}
	reload(func(bs []config.Backend) { bs[0].Backup, bs[1].Backup = true, false })
	if got := routed(s); !sameAddrs(got, b.addr) || s.route.Load().backups {
		t.Errorf("right after the reload swapping the roles: route %v (on backups %v), want b as the primary", got, s.route.Load().backups)
	}
	reload(func(bs []config.Backend) {})
	if got := routed(s); !sameAddrs(got, p.addr) {
		t.Errorf("right after the reload back to the first config: route %v, want the primary", got)
	}
	wantLog(t, logs, "primary backend usable again: routing to primaries")
}

// panic_mode = "all" applies only when neither a primary nor a backup is
// usable, and then routes to every weighted backend, backups included.
func TestBackupPanicMode(t *testing.T) {
	live := startEcho(t)
	tests := []struct {
		name      string
		mode      config.PanicMode
		backupUp  bool
		want      int // routed backends
		panicking bool
		backups   bool
	}{
		{"all, backup up", config.PanicAll, true, 1, false, true},
		{"all, everything down", config.PanicAll, false, 3, true, false},
		{"none, everything down", config.PanicNone, false, 0, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			backup := closedAddr(t)
			if tt.backupUp {
				backup = live
			}
			cfg := checkedConfig(closedAddr(t), closedAddr(t), backup)
			cfg.Backends[2].Backup = true
			cfg.PanicMode = tt.mode
			s := newCheckedService(t, cfg)
			eventually(t, "primaries down", func() bool {
				return backendOf(s, cfg.Backends[0].Address).health.tracker.State() == health.Down &&
					backendOf(s, cfg.Backends[1].Address).health.tracker.State() == health.Down
			})
			if tt.backupUp {
				eventually(t, "backup up", isUp(s, backup))
			} else {
				eventually(t, "backup down", func() bool { return backendOf(s, backup).health.tracker.State() == health.Down })
			}
			time.Sleep(2 * rebuildDelay) // the rebuild after the last change
			r := s.route.Load()
			if len(r.backends) != tt.want || r.panicking != tt.panicking || r.backups != tt.backups {
				t.Errorf("route %v, panicking %v, on backups %v; want %d backends, panicking %v, on backups %v",
					routed(s), r.panicking, r.backups, tt.want, tt.panicking, tt.backups)
			}
		})
	}
}

// A primary that passive detection took down is not usable: with no
// other primary, new connections go to the backup.
func TestBackupAfterPassiveMarkDown(t *testing.T) {
	p, b := newNamedBackend(t, "p"), newNamedBackend(t, "b")
	cfg := checkedConfig(p.addr, b.addr)
	cfg.Backends[1].Backup = true
	cfg.Health.Interval, cfg.Health.Timeout = time.Hour, time.Second // only the first probe
	addr, s, _ := loggedService(t, cfg)
	eventually(t, "both up", func() bool { return isUp(s, p.addr)() && isUp(s, b.addr)() })
	eventually(t, "the primary routed", func() bool { return sameAddrs(routed(s), p.addr) })
	be := backendOf(s, p.addr)
	for range cfg.PassiveFall {
		s.connectFailed(cfg, be, errConnectTimeout)
	}
	eventually(t, "the backup routed", func() bool { return sameAddrs(routed(s), b.addr) })
	if name, _ := dialNamed(t, addr); name != "b" {
		t.Errorf("client with the primary down by passive detection served by %q, want the backup", name)
	}
}

// A fresh start waits for the primaries' first checks, not only for a
// backend to be up: a backup that answers first must not take the clients
// queued at start.
func TestBackupStartWaitsForPrimaries(t *testing.T) {
	slow := startBackend(t, func(c net.Conn) {
		time.Sleep(150 * time.Millisecond)
		echo(c)
	})
	backup := startEcho(t)
	var listen = ownAddr("127.88.11.2:7000")
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
  [[services.db.backends]]
  address = %q
  backup = true
`, listen, slow, backup)), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	c, applied := applyAndDialOn(t, srv, cfg, listen)
	roundTrip(t, c, "the first client")
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	svc := srv.Services()[0]
	if n := backendOf(svc, backup).total.Load(); n != 0 {
		t.Errorf("the backup took %d of the clients queued at start; the primary %d", n, backendOf(svc, slow).total.Load())
	}
}

// metricsOf returns a function that gathers srv's gauges, keyed by name
// and, for a backend's, {address}.
func metricsOf(srv *Server) func(t *testing.T) map[string]float64 {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewMetrics(srv))
	return func(t *testing.T) map[string]float64 {
		t.Helper()
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, f := range families {
			for _, m := range f.GetMetric() {
				key := f.GetName()
				for _, l := range m.GetLabel() {
					if l.GetName() == "backend" {
						key += "{" + l.GetValue() + "}"
					}
				}
				out[key] = m.GetGauge().GetValue()
			}
		}
		return out
	}
}

// /metrics says which backends are backups and whether a service routes
// to them; the reload summary names a change of backup.
func TestBackupMetricsAndReloadSummary(t *testing.T) {
	primary, backup := startEcho(t), startEcho(t)
	var listen = ownAddr("127.88.11.3:7000")
	text := func(primaryWeight int, backupFlag bool) string {
		return fmt.Sprintf(`[services.db]
listen = %q
  [[services.db.backends]]
  address = %q
  weight = %d
  [[services.db.backends]]
  address = %q
  backup = %t
`, listen, primary, primaryWeight, backup, backupFlag)
	}
	srv, logs := loggedServer(t, text(0, true))
	t.Cleanup(srv.Shutdown)
	gauges := metricsOf(srv)
	want := func(when string, routing, primaryBackup, backupBackup float64) {
		t.Helper()
		g := gauges(t)
		if g["l4lb_service_routing_to_backups"] != routing || g["l4lb_backend_backup{"+primary.String()+"}"] != primaryBackup ||
			g["l4lb_backend_backup{"+backup.String()+"}"] != backupBackup {
			t.Errorf("%s: routing_to_backups %v, backend_backup %v and %v; want %v, %v, %v", when,
				g["l4lb_service_routing_to_backups"], g["l4lb_backend_backup{"+primary.String()+"}"],
				g["l4lb_backend_backup{"+backup.String()+"}"], routing, primaryBackup, backupBackup)
		}
	}
	want("primary at weight 0", 1, 0, 1)
	wantLog(t, logs, "no usable primary backend: routing to 1 backups")

	apply := func(text string) string {
		t.Helper()
		cfg, err := config.Parse([]byte(text), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		change, err := srv.Apply(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		return change.Summary
	}
	apply(text(100, true))
	want("primary at weight 100", 0, 0, 1)
	wantLog(t, logs, "primary backend usable again: routing to primaries")
	if got, w := apply(text(100, false)), "~"+backup.String()+" backup true→false"; !strings.Contains(got, w) {
		t.Errorf("reload summary %q lacks %q", got, w)
	}
	want("no backup", 0, 0, 0)
}

// A UDP service: new flows go to the primary while it is up, to the
// backup while it is not (weight 0, or down by its checks), and a flow
// opened on the backup stays there once the primary is back.
func TestUDPBackup(t *testing.T) {
	p, b := newUDPEcho(t, "p"), newUDPEcho(t, "b")
	cfg := udpConfig(p.addr, b.addr)
	cfg.Backends[1].Backup = true
	cfg.Health = config.Health{Kind: config.HealthSendExpect, Interval: 50 * time.Millisecond, Timeout: 40 * time.Millisecond,
		Rise: 2, Fall: 2, Send: "ping", ExpectRegex: "^[a-z]+:ping$"}
	svc, _ := startUDPService(t, cfg)
	eventually(t, "both up", func() bool { return isUp(svc, p.addr)() && isUp(svc, b.addr)() })
	eventually(t, "the primary routed", func() bool { return sameAddrs(routed(svc), p.addr) })
	for i := range 10 {
		if got := newUDPClient(t, cfg.Listen).exchange(fmt.Sprintf("client %d", i)); got != "p" {
			t.Fatalf("client %d with the primary up served by %q, want p", i, got)
		}
	}

	maint := *cfg
	maint.Backends = append([]config.Backend(nil), cfg.Backends...)
	maint.Backends[0].Weight = 0
	svc.Update(&maint)
	onBackup := newUDPClient(t, cfg.Listen)
	if got := onBackup.exchange("during maintenance"); got != "b" {
		t.Fatalf("new flow with the primary at weight 0 served by %q, want the backup", got)
	}
	if st := svc.Status(); !st.RoutingToBackups {
		t.Error("status with the primary at weight 0 does not say the service routes to its backups")
	}
	svc.Update(cfg)
	if got := newUDPClient(t, cfg.Listen).exchange("after maintenance"); got != "p" {
		t.Errorf("new flow with the primary back served by %q, want p", got)
	}
	if got := onBackup.exchange("the same flow"); got != "b" {
		t.Errorf("the flow opened on the backup answered by %q once the primary was back; want it to stay on b", got)
	}

	p.stop()
	eventually(t, "the backup routed once the primary's checks fail", func() bool { return sameAddrs(routed(svc), b.addr) })
	if got := newUDPClient(t, cfg.Listen).exchange("primary down"); got != "b" {
		t.Errorf("new flow with the primary down served by %q, want the backup", got)
	}
}

// The plan (every weighted backend healthy) never names a backup while a
// primary has weight > 0, and names the backups when every primary is at
// weight 0, as the route does.
func TestPlanLeavesBackupsOut(t *testing.T) {
	primary, backup := netip.MustParseAddrPort("10.0.0.1:5432"), netip.MustParseAddrPort("10.0.0.2:5432")
	svc := &config.Service{Balance: config.Maglev, HashKey: config.SourceIPPort, Backends: []config.Backend{
		{Address: primary, Weight: 1}, {Address: backup, Weight: 1000, Backup: true},
	}}
	maint := *svc
	maint.Backends = []config.Backend{{Address: primary, Weight: 0}, {Address: backup, Weight: 1000, Backup: true}}
	plan, maintPlan := NewPlan(svc), NewPlan(&maint)
	for i := range 200 {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), uint16(40000+i))
		if got, _ := plan.First(client); got != primary {
			t.Fatalf("client %s planned on %s, want the primary", client, got)
		}
		if got, _ := maintPlan.First(client); got != backup {
			t.Fatalf("primary at weight 0: client %s planned on %s, want the backup", client, got)
		}
	}
}

// A connect in flight to the only primary when its checks mark it down
// goes to the backup the route now holds, as nginx's next upstream does,
// rather than closing the client for want of a next backend in the
// primaries' route: under on_down = "close" (the connect completes after
// the mark-down) and when the connect fails once the route has moved (the
// primary's host gone: it times out).
func TestConnectInFlightToFailedPrimaryReachesBackup(t *testing.T) {
	for _, tt := range []struct {
		name           string
		onDown         config.OnDown
		connectTimeout time.Duration
		release        bool // the primary completes the connect after its mark-down
	}{
		{"on_down close, connect completes", config.OnDownClose, 10 * time.Second, true},
		// Long enough for the route to move first, even on a loaded host.
		{"connect times out", config.OnDownKeep, time.Second, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			primary := newSlowBackend(t) // its connects hang until released
			backup := startEcho(t)
			check := newRestartable(t)
			cfg := checkedConfig(primary.addr, backup)
			cfg.Backends[1].Backup = true
			cfg.Health.Port = check.addr.Port()
			cfg.Health.Interval = time.Hour // probed once, at the start
			cfg.OnDown = tt.onDown
			cfg.ConnectTimeout = tt.connectTimeout
			addr, s := startService(t, time.Minute)
			s.Update(cfg)
			eventually(t, "both up, the primary routed", func() bool {
				return isUp(s, backup)() && sameAddrs(routed(s), primary.addr)
			})

			c, err := net.Dial("tcp", addr.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			be := backendOf(s, primary.addr)
			eventually(t, "the connect to the primary in flight", func() bool { return be.active.Load() == 1 })
			if tr, changed := be.health.tracker.Force(health.Down, "marked down by the test"); changed {
				s.health.transition(cfg, be, tr, true)
			}
			eventually(t, "the backup routed", func() bool { return sameAddrs(routed(s), backup) })
			if tt.release {
				primary.release(t)
			}
			roundTrip(t, c, "served by the backup")
			if n := s.refused.Load(); n != 0 {
				t.Errorf("%d clients refused", n)
			}
		})
	}
}

// /metrics tells a healthy backup from a dead one while the primary
// serves: backend_up is 0 for both (neither is in the route), so without
// backend_healthy a standby that has died goes unseen until the failover
// that needs it.
func TestBackupHealthInMetrics(t *testing.T) {
	primary, standby, dead := startEcho(t), startEcho(t), closedAddr(t)
	var listen = ownAddr("127.88.11.4:7000")
	srv, _ := loggedServer(t, fmt.Sprintf(`[services.db]
listen = %q
  [services.db.health]
  kind = "tcp"
  interval = "50ms"
  timeout = "40ms"
  fall = 1
  [[services.db.backends]]
  address = %q
  [[services.db.backends]]
  address = %q
  backup = true
  [[services.db.backends]]
  address = %q
  backup = true
`, listen, primary, standby, dead))
	t.Cleanup(srv.Shutdown)
	svc := srv.Services()[0]
	eventually(t, "the primary and the standby up, the dead backup down", func() bool {
		return isUp(svc, primary)() && isUp(svc, standby)() && backendOf(svc, dead).health.tracker.State() == health.Down
	})
	g := metricsOf(srv)(t)
	for _, tt := range []struct {
		backend     netip.AddrPort
		up, healthy float64
	}{
		{primary, 1, 1},
		{standby, 0, 1},
		{dead, 0, 0},
	} {
		if up, healthy := g["l4lb_backend_up{"+tt.backend.String()+"}"], g["l4lb_backend_healthy{"+tt.backend.String()+"}"]; up != tt.up || healthy != tt.healthy {
			t.Errorf("%s: backend_up %v, backend_healthy %v; want %v, %v", tt.backend, up, healthy, tt.up, tt.healthy)
		}
	}
}

// A start whose primary's first probe times out (its host gone) after
// the backup has answered serves from the backup at once, the primary
// still unknown (fall > 1), and warns so then, not only once fall probes
// have failed.
func TestBackupStartOnBackupsWarns(t *testing.T) {
	primary := newSlowBackend(t) // its connects hang: the probe times out
	backup := startEcho(t)
	srv, logs := loggedServer(t, primaryAndBackup(ownAddr("127.88.11.5:7000"), "300ms", primary.addr, backup))
	t.Cleanup(srv.Shutdown)
	if r := srv.Services()[0].route.Load(); !r.backups {
		t.Fatalf("started on %v, want the backup", routed(srv.Services()[0]))
	}
	wantLog(t, logs, "no usable primary backend: routing to 1 backups")
	if n := strings.Count(logs.String(), "no usable primary backend"); n != 1 {
		t.Errorf("warned %d times, want once:\n%s", n, logs.String())
	}
}

// A reload that swaps in a primary whose first probe outlasts the wait for
// it (a timeout above the wait's 2 s) moves new clients to the backup when
// the wait ends, and warns then: the primary stays unknown until fall
// probes have failed, and no other route rebuild would tell.
func TestBackupReloadPastTheFirstChecksWaitWarns(t *testing.T) {
	primary, backup := startEcho(t), startEcho(t)
	unanswering := newSlowBackend(t) // its connects hang: the probe times out
	listen := ownAddr("127.88.11.6:7000")
	srv, logs := loggedServer(t, primaryAndBackup(listen, "3s", primary, backup))
	t.Cleanup(srv.Shutdown)
	s := srv.Services()[0]
	eventually(t, "the primary routed", func() bool { return sameAddrs(routed(s), primary) })
	next, err := config.Parse([]byte(primaryAndBackup(listen, "3s", unanswering.addr, backup)), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Apply(context.Background(), next); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the backup routed once the wait is over", func() bool { return s.route.Load().backups })
	wantLog(t, logs, "no usable primary backend: routing to 1 backups")
}

// primaryAndBackup is the config of a service db on listen with one
// primary and one backup, probed by TCP connects every 10 s with timeout,
// down after 3 failures.
func primaryAndBackup(listen, timeout string, primary, backup netip.AddrPort) string {
	return fmt.Sprintf(`[services.db]
listen = %q
  [services.db.health]
  kind = "tcp"
  interval = "10s"
  timeout = %q
  fall = 3
  [[services.db.backends]]
  address = %q
  [[services.db.backends]]
  address = %q
  backup = true
`, listen, timeout, primary, backup)
}
