package l4

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
)

// The reload summary names every change, settings outside services too,
// and says which wait for a restart: "no change" for a change that was
// applied (or silently was not) misleads whoever reads the log.
func TestDescribeChangeNamesSettings(t *testing.T) {
	parse := func(top string) *config.Config {
		t.Helper()
		cfg, err := config.Parse([]byte(top+`
[services.db]
listen = "127.0.0.1:5432"
  [[services.db.backends]]
  address = "10.0.0.1:5432"
`), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	old := parse("[admin]\nlisten = \"127.0.0.1:9901\"\n")
	if got := describeChange(old, parse("# a comment\n[admin]\nlisten = \"127.0.0.1:9901\"\n")); got != "no change (formatting or comments)" {
		t.Errorf("comment only: %q", got)
	}
	got := describeChange(old, parse("[admin]\nlisten = \"127.0.0.1:9902\"\n[log]\nformat = \"json\"\n[process]\nuser = \"nobody\"\n"))
	for _, want := range []string{
		`admin.listen "127.0.0.1:9901" -> "127.0.0.1:9902"`,
		`log.format "text" -> "json" (takes effect at restart)`,
		`process.user "" -> "nobody" (takes effect at restart)`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("summary %q lacks %q", got, want)
		}
	}
	if strings.Contains(got, "admin.listen \"127.0.0.1:9901\" -> \"127.0.0.1:9902\" (takes effect at restart)") {
		t.Errorf("admin.listen moves on reload, yet the summary says restart: %q", got)
	}
}

// Every applied service change is named: health, panic mode, a backend's
// max_connections and max_flows were once summarised as "no change".
func TestDescribeChangeNamesServiceSettings(t *testing.T) {
	parse := func(settings, backend string) *config.Config {
		t.Helper()
		cfg, err := config.Parse([]byte(`
[services.db]
listen = "127.0.0.1:5432"
`+settings+`
  [services.db.health]
  kind = "tcp"
  interval = "10s"
  [[services.db.backends]]
  address = "10.0.0.1:5432"
`+backend), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	old := parse("", "")
	for _, tc := range []struct{ settings, backend, want string }{
		{settings: `panic_mode = "all"`, want: "health"},
		{settings: `on_down = "close"`, want: "health"},
		{settings: `on_failback = "close"`, want: "health"},
		{backend: "  max_connections = 10\n", want: "~10.0.0.1:5432 max_connections 0→10"},
	} {
		if got := describeChange(old, parse(tc.settings, tc.backend)); !strings.Contains(got, tc.want) {
			t.Errorf("%q%q summarised as %q, want %q in it", tc.settings, tc.backend, got, tc.want)
		}
	}
	interval := parse("", "")
	interval.Services[0].Health.Interval = time.Second
	if got := describeChange(old, interval); !strings.Contains(got, "health") {
		t.Errorf("a new health interval summarised as %q", got)
	}
}

// TestServicesSpreadOverLoops starts as many single-worker services as
// there are event loops: each must accept on a loop of its own, since its
// connections run on the loop that accepted them. All of them used to
// start on loop 0, leaving the other cores idle.
func TestServicesSpreadOverLoops(t *testing.T) {
	n := len(loops().loops)
	if n < 2 {
		t.Fatalf("needs at least 2 event loops, one per core (GOMAXPROCS=%d here)", n)
	}
	echo := startEcho(t)
	var file strings.Builder
	for i := range n {
		fmt.Fprintf(&file, "[services.s%d]\nlisten = %q\nworkers = 1\n[[services.s%d.backends]]\naddress = %q\n",
			i, freeLoopbackPort(t).String(), i, echo.String())
	}
	cfg, err := config.Parse([]byte(file.String()), "spread.toml")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	if _, err := srv.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	used := map[*eventLoop][]string{}
	for _, rs := range srv.running {
		for _, a := range rs.listeners {
			used[a.loop] = append(used[a.loop], rs.cfg.Name)
		}
	}
	if len(used) != n {
		t.Errorf("%d single-worker services accept on %d of %d loops: %v", n, len(used), n, slices.Collect(maps.Values(used)))
	}
}

// freeLoopbackPort is a TCP port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestRaisingWorkersAfterUserSwitchIsRejected reloads a service with more
// workers after l4lb switched users (process.user): the kernel would
// refuse the new sockets with "address already in use", so the reload is
// rejected first, with a message that says why, and the service keeps
// its sockets. As the same user, raising workers adds sockets. As root
// the test switches the process's effective uid for real (keeping 0 as
// the saved uid, to switch back); otherwise it tells the Server another
// uid.
func TestRaisingWorkersAfterUserSwitchIsRejected(t *testing.T) {
	echo, listen := startEcho(t), freeLoopbackPort(t)
	parse := func(workers int) *config.Config {
		t.Helper()
		cfg, err := config.Parse([]byte(fmt.Sprintf("[services.pg]\nlisten = %q\nworkers = %d\n[[services.pg.backends]]\naddress = %q\n",
			listen.String(), workers, echo.String())), "workers.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	srv := NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	started := os.Geteuid()
	switchTo := func(uid int) {
		t.Helper()
		if err := syscall.Setresuid(-1, uid, -1); err != nil {
			t.Fatal(err)
		}
	}
	if started == 0 {
		t.Cleanup(func() { switchTo(0) })
	} else {
		uid := started
		srv.geteuid = func() int { return uid }
		switchTo = func(u int) { uid = u }
	}
	if _, err := srv.Apply(context.Background(), parse(1)); err != nil {
		t.Fatal(err)
	}
	switchTo(started + 1) // process.user takes effect after the first Apply
	_, err := srv.Apply(context.Background(), parse(2))
	switchTo(started)
	if err == nil || !strings.Contains(err.Error(), "services.pg.workers: 1 -> 2: with process.user, workers can be raised only at restart") {
		t.Fatalf("raising workers as another user: %v; want the reload rejected, saying why", err)
	}
	if v, _, _ := srv.Version(); v != 1 || len(srv.running[socketKey{config.TCP, listen}].listeners) != 1 {
		t.Errorf("after the rejected reload: version %d, want 1, and the service's single socket", v)
	}

	if _, err := srv.Apply(context.Background(), parse(2)); err != nil {
		t.Fatalf("raising workers as the user that bound the sockets: %v", err)
	}
	if n := len(srv.running[socketKey{config.TCP, listen}].listeners); n != 2 {
		t.Errorf("%d sockets after raising workers to 2", n)
	}
}
