package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
	"github.com/l4lb/l4lb/listener"
)

// admin serves the local admin endpoint: GET /status (JSON), GET /metrics
// (Prometheus) and POST /reload (503 once l4lb is stopping). Nothing else
// changes state; every other method is refused.
type admin struct {
	log     hclog.Logger
	handler http.Handler

	mu     sync.Mutex // guards addr, server, ln, paused and started
	addr   string
	server *http.Server
	// ln is what server serves on.
	ln *pausableListener
	// paused: prepare paused ln to bind an address overlapping it; commit
	// or abort ends that.
	paused bool
	// started: the first commit, at start, is done; reloads come after.
	started bool

	// retiring counts the old servers still finishing their requests.
	retiring sync.WaitGroup

	// upgrades carries each POST /upgrade to run's loop, which answers on
	// the channel sent once the upgrade has ended.
	upgrades chan chan<- upgradeResult
}

func newAdmin(log hclog.Logger, srv *l4.Server, rl *reloader) *admin {
	reg := prometheus.NewRegistry()
	reg.MustRegister(l4.NewMetrics(srv), rl.metrics(), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(buildStatus(srv, rl))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("POST /reload", func(w http.ResponseWriter, r *http.Request) {
		change, err := rl.reload(rl.context(), "admin POST /reload")
		w.Header().Set("Content-Type", "application/json")
		res := reloadResult{OldVersion: change.OldVersion, Version: change.Version, Changes: change.Summary}
		switch {
		case errors.Is(err, errStopping), errors.Is(err, errUpgraded):
			res.Error = err.Error()
			w.WriteHeader(http.StatusServiceUnavailable)
		case err != nil:
			res.Error = err.Error()
			w.WriteHeader(http.StatusUnprocessableEntity)
		}
		json.NewEncoder(w).Encode(res)
	})
	upgrades := make(chan chan<- upgradeResult)
	mux.HandleFunc("POST /upgrade", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		reply := make(chan upgradeResult, 1)
		select {
		case upgrades <- reply:
		case <-time.After(upgradeAskTimeout):
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(upgradeJSON{OldPid: os.Getpid(), Error: "l4lb takes no upgrade now: it is starting or stopping"})
			return
		}
		res := <-reply // every request taken is answered
		out := upgradeJSON{OldPid: os.Getpid(), Pid: res.pid}
		switch {
		case errors.Is(res.err, errStopping), errors.Is(res.err, errUpgradeCancelled):
			out.Error = res.err.Error()
			w.WriteHeader(http.StatusServiceUnavailable)
		case res.err != nil:
			out.Error = res.err.Error()
			w.WriteHeader(http.StatusUnprocessableEntity)
		}
		json.NewEncoder(w).Encode(out)
	})
	for _, path := range []string{"/reload", "/upgrade"} {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			// Any other method than POST: without this, "/" below would
			// answer, offering GET.
			w.Header().Set("Allow", http.MethodPost)
			http.Error(w, path[1:]+" with POST "+path, http.StatusMethodNotAllowed)
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "the admin endpoint is read-only, except POST /reload and POST /upgrade", http.StatusMethodNotAllowed)
			return
		}
		http.NotFound(w, r)
	})
	return &admin{log: log, handler: mux, upgrades: upgrades}
}

// upgradeAskTimeout bounds how long POST /upgrade waits for l4lb to take
// it: l4lb takes it at once unless it is starting or stopping.
const upgradeAskTimeout = 5 * time.Second

// upgradeJSON is the answer to POST /upgrade: 200 once the new process
// (Pid) serves, 422 with Error when it failed and OldPid serves on, 503
// when l4lb is stopping.
type upgradeJSON struct {
	OldPid int    `json:"old_pid"`
	Pid    int    `json:"pid,omitempty"`
	Error  string `json:"error,omitempty"`
}

type reloadResult struct {
	OldVersion uint64 `json:"old_version"`
	Version    uint64 `json:"version"`
	Changes    string `json:"changes,omitempty"`
	Error      string `json:"error,omitempty"`
}

// listenTCP listens on addr as services do (listener.Network): 0.0.0.0 on
// IPv4 only, not over IPv6 too. A host name (-pprof localhost:6060) is
// left to net.Listen.
func listenTCP(addr string) (net.Listener, error) {
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		return net.Listen(listener.Network("tcp", ap), addr)
	}
	return net.Listen("tcp", addr)
}

// prepare binds addr if it differs from the address served now, so that a
// reload can fail before anything changes. It returns nil when there is
// nothing to bind. The caller then calls commit, or abort if the reload
// fails.
//
// An address on the same port as the one served now may overlap it
// (127.0.0.1:P and 0.0.0.0:P, or [::]:P): the kernel refuses the new
// socket because of the old one, while it listens. prepare then pauses
// the old socket and binds again: a paused socket keeps its address, but
// one that does not listen lets another with SO_REUSEADDR (which Go sets
// on every listener) bind beside it. If that fails too, someone else
// holds the port, and the old socket listens again at once. HAProxy
// pauses its listeners this way on reload.
func (a *admin) prepare(addr string) (net.Listener, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if addr == a.addr || addr == "" {
		return nil, nil
	}
	ln, err := listenTCP(addr)
	if errors.Is(err, syscall.EADDRINUSE) && a.ln != nil && samePort(addr, a.addr) {
		if err := a.ln.pause(); err != nil {
			return nil, fmt.Errorf("admin.listen: pause the endpoint on %s to move it onto the same port: %w", a.addr, err)
		}
		ln, err = listenTCP(addr)
		if errors.Is(err, syscall.EADDRINUSE) {
			a.resume()
			return nil, fmt.Errorf("admin.listen: %w (l4lb's own endpoint on %s gave way for it: another program holds the port)", err, a.addr)
		}
		if err != nil {
			a.resume()
		} else {
			a.paused = true
		}
	}
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) && !a.started {
			// At start the likeliest holder is an l4lb already running;
			// on a reload, another program took the new address.
			return nil, fmt.Errorf("admin.listen: %w (is another l4lb running with this config? `l4lb status -admin %s` asks it)", err, addr)
		}
		return nil, errors.New("admin.listen: " + err.Error())
	}
	return ln, nil
}

// socketFile returns a duplicate of the endpoint's listening socket and
// the admin.listen it serves, for an upgrade to pass on; nil when the
// endpoint is off.
func (a *admin) socketFile() (*os.File, string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ln == nil {
		return nil, "", nil
	}
	// Not net's File(): exec hands on a descriptor from it by Fd, which
	// clears O_NONBLOCK, and the flag belongs to the socket this process
	// still accepts from: its accept would then wait in the kernel, and
	// closing the endpoint with it. os.NewFile's Fd leaves the flag alone.
	dup := -1
	err := a.ln.control(func(fd int) error {
		var err error
		dup, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, "", fmt.Errorf("admin endpoint: %w", err)
	}
	return os.NewFile(uintptr(dup), "admin"), a.addr, nil
}

// samePort reports whether the addresses a and b have the same port, not 0.
func samePort(a, b string) bool {
	ap, errA := netip.ParseAddrPort(a)
	bp, errB := netip.ParseAddrPort(b)
	return errA == nil && errB == nil && ap.Port() != 0 && ap.Port() == bp.Port()
}

// abort undoes prepare for a reload that failed: ln (from prepare, or
// nil) is closed, and the endpoint served now listens again if prepare
// paused it.
func (a *admin) abort(ln net.Listener) {
	if ln != nil {
		ln.Close()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.paused {
		a.resume()
	}
}

// resume has the paused listener listen again. Should that fail (another
// program with SO_REUSEADDR bound the address while it was paused), the
// endpoint is off until a reload binds it again. mu is held.
func (a *admin) resume() {
	a.paused = false
	if err := a.ln.resume(); err != nil {
		a.log.Error("admin endpoint lost: it was paused to move it, and cannot listen again; a reload binds it again", "listen", a.addr, "error", err)
		a.server.Close()
		a.server, a.ln, a.addr = nil, nil, ""
	}
}

// commit serves on ln (from prepare) at addr and stops the old server;
// with addr "" it only stops the old one.
func (a *admin) commit(addr string, ln net.Listener) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.started = true
	a.paused = false
	if addr == a.addr {
		return
	}
	if a.server != nil {
		// The old socket closes now, freeing its address; the requests
		// the old server is handling finish in the background. Waiting
		// for them here would have a POST /reload that moves the
		// endpoint wait for itself.
		a.ln.Close()
		a.retiring.Add(1)
		go a.retire(a.server)
		a.server, a.ln = nil, nil
	}
	a.addr = addr
	if ln == nil {
		a.log.Info("admin endpoint disabled")
		return
	}
	a.ln = &pausableListener{Listener: ln}
	a.server = &http.Server{Handler: a.handler, ReadHeaderTimeout: 5 * time.Second}
	go a.server.Serve(a.ln)
	a.log.Info("admin endpoint listening", "listen", ln.Addr().String())
}

// pausableListener is a listener that pause stops listening without
// giving up its address, and resume has listen again; meanwhile its
// Accept waits instead of failing, which would end http.Server.Serve
// and close the socket.
type pausableListener struct {
	net.Listener

	mu sync.Mutex // guards pauses and resumed
	// pauses counts the pauses begun: an Accept that fails once one has
	// begun since it was called failed because of it, even if it sees
	// the failure only after the pause ended.
	pauses int
	// resumed is closed once a pause ends, by resume or Close; nil when
	// not paused.
	resumed chan struct{}
}

func (l *pausableListener) Accept() (net.Conn, error) {
	for {
		l.mu.Lock()
		pauses := l.pauses
		l.mu.Unlock()
		c, err := l.Listener.Accept()
		if err == nil {
			return c, nil
		}
		l.mu.Lock()
		paused, resumed := l.pauses != pauses, l.resumed
		l.mu.Unlock()
		if errors.Is(err, net.ErrClosed) || (!paused && resumed == nil) {
			return nil, err
		}
		if resumed != nil {
			<-resumed
		}
	}
}

// pause stops listening: shutdown(2) of a listening socket resets the
// connections in its queue and keeps its address bound (one bound to an
// explicit port, as the admin endpoint's always is here: samePort).
func (l *pausableListener) pause() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pauses++
	l.resumed = make(chan struct{})
	err := l.control(func(fd int) error { return unix.Shutdown(fd, unix.SHUT_RD) })
	if err != nil {
		close(l.resumed)
		l.resumed = nil
	}
	return err
}

func (l *pausableListener) resume() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	// The kernel caps the backlog at net.core.somaxconn, which is what
	// Go's net.Listen asks for.
	err := l.control(func(fd int) error { return unix.Listen(fd, unix.SOMAXCONN) })
	if l.resumed != nil {
		close(l.resumed)
		l.resumed = nil
	}
	return err
}

func (l *pausableListener) Close() error {
	err := l.Listener.Close()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.resumed != nil {
		close(l.resumed)
		l.resumed = nil
	}
	return err
}

// control runs f on the listener's socket.
func (l *pausableListener) control(f func(fd int) error) error {
	sc, ok := l.Listener.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%T has no socket to control", l.Listener)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := raw.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// retire lets server finish the requests it is handling, for up to
// adminDrainTimeout, then closes their connections.
func (a *admin) retire(server *http.Server) {
	defer a.retiring.Done()
	ctx, cancel := context.WithTimeout(context.Background(), adminDrainTimeout)
	defer cancel()
	if server.Shutdown(ctx) != nil {
		server.Close()
	}
}

// adminDrainTimeout bounds how long an admin server that stopped serving
// lets its requests in progress finish: they are short, and l4lb's exit
// waits for them.
const adminDrainTimeout = 2 * time.Second

// close stops the endpoint once its requests in progress, and those of
// servers that reloads moved away from, have finished (within
// adminDrainTimeout).
func (a *admin) close() {
	a.commit("", nil)
	a.retiring.Wait()
}

// statusJSON is the document of GET /status.
type statusJSON struct {
	Version           uint64        `json:"version"`
	Hash              string        `json:"hash"`
	LoadedAt          time.Time     `json:"loaded_at"`
	ReloadsOK         uint64        `json:"reloads_ok"`
	ReloadsFailed     uint64        `json:"reloads_failed"`
	LastReloadError   string        `json:"last_reload_error,omitempty"`
	LastReloadErrorAt *time.Time    `json:"last_reload_error_at,omitempty"`
	LastReloadOKAt    *time.Time    `json:"last_reload_ok_at,omitempty"`
	Services          []serviceJSON `json:"services"`

	// OpenConnections and MaxConnections: TCP connections open over all
	// services, and the bound from RLIMIT_NOFILE (0 without one).
	OpenConnections int64 `json:"open_connections"`
	MaxConnections  int64 `json:"max_connections"`

	// Stopping: l4lb is stopping; every service drains (and says so).
	Stopping bool `json:"stopping,omitempty"`
}

type serviceJSON struct {
	Name     string `json:"name"`
	Listen   string `json:"listen"`
	Protocol string `json:"protocol"`
	Balance  string `json:"balance"`
	// Unchecked: the service has no health checks (every backend counts
	// as up). Said this way round so that an older l4lb, which omits it,
	// reads as checked.
	Unchecked bool `json:"unchecked,omitempty"`
	// RoutingToBackups: no primary backend is usable, and new connections
	// go to the backups.
	RoutingToBackups bool          `json:"routing_to_backups"`
	Accepted         uint64        `json:"accepted"`
	Refused          uint64        `json:"refused"`
	Errors           uint64        `json:"errors"`
	Backends         []backendJSON `json:"backends"`
	UDP              *udpJSON      `json:"udp,omitempty"`

	// Rejected counts TCP clients closed by limits, access lists and the
	// PROXY protocol checks, by reason.
	Rejected map[string]uint64 `json:"rejected,omitempty"`

	// Draining: the service no longer accepts, and its open connections
	// finish within its drain_timeout (l4lb is stopping).
	Draining bool `json:"draining,omitempty"`
}

type backendJSON struct {
	Address         string          `json:"address"`
	Weight          int             `json:"weight"`
	Configured      bool            `json:"configured"`
	Backup          bool            `json:"backup"`
	InRoute         bool            `json:"in_route"`
	Health          string          `json:"health"`
	LastTransition  *transitionJSON `json:"last_transition,omitempty"`
	LastFailure     string          `json:"last_failure,omitempty"`
	Active          int64           `json:"active"`
	Total           uint64          `json:"total"`
	ConnectFailures uint64          `json:"connect_failures"`
	BytesToBackend  uint64          `json:"bytes_to_backend"`
	BytesToClient   uint64          `json:"bytes_to_client"`
	Draining        bool            `json:"draining"`
	DrainDeadline   *time.Time      `json:"drain_deadline,omitempty"`
}

type transitionJSON struct {
	From   string    `json:"from"`
	To     string    `json:"to"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// udpJSON is a UDP service's counters in /status, with drops by reason
// name rather than by index.
type udpJSON struct {
	DatagramsToBackend uint64            `json:"datagrams_to_backend"`
	BytesToBackend     uint64            `json:"bytes_to_backend"`
	DatagramsToClient  uint64            `json:"datagrams_to_client"`
	BytesToClient      uint64            `json:"bytes_to_client"`
	FlowsActive        int64             `json:"flows_active"`
	FlowsCreated       uint64            `json:"flows_created"`
	FlowsExpired       uint64            `json:"flows_expired"`
	FlowsAnswered      uint64            `json:"flows_answered"`
	FlowsClosed        uint64            `json:"flows_closed"`
	FlowsRefused       uint64            `json:"flows_refused"`
	FlowsHandedOver    uint64            `json:"flows_handed_over"`
	FlowsTakenOver     uint64            `json:"flows_taken_over"`
	Drops              map[string]uint64 `json:"drops"`
}

func newUDPJSON(st *l4.UDPStats) *udpJSON {
	if st == nil {
		return nil
	}
	u := &udpJSON{
		DatagramsToBackend: st.DatagramsToBackend, BytesToBackend: st.BytesToBackend,
		DatagramsToClient: st.DatagramsToClient, BytesToClient: st.BytesToClient,
		FlowsActive: st.FlowsActive, FlowsCreated: st.FlowsCreated, FlowsExpired: st.FlowsExpired,
		FlowsAnswered: st.FlowsAnswered, FlowsClosed: st.FlowsClosed, FlowsRefused: st.FlowsRefused,
		FlowsHandedOver: st.FlowsHandedOver, FlowsTakenOver: st.FlowsTakenOver, Drops: map[string]uint64{},
	}
	for reason, n := range st.Drops {
		u.Drops[l4.DropReason(reason).String()] = n
	}
	return u
}

func buildStatus(srv *l4.Server, rl *reloader) statusJSON {
	st := srv.Status()
	out := statusJSON{Version: st.Version, Hash: st.Hash, LoadedAt: st.LoadedAt, Services: []serviceJSON{},
		OpenConnections: st.OpenConnections, MaxConnections: st.MaxConnections, Stopping: st.Stopping}
	rs := rl.stats()
	out.ReloadsOK, out.ReloadsFailed, out.LastReloadError = rs.ok, rs.failed, rs.lastError
	if !rs.lastOKAt.IsZero() {
		out.LastReloadOKAt = &rs.lastOKAt
	}
	if !rs.lastErrorAt.IsZero() {
		out.LastReloadErrorAt = &rs.lastErrorAt
	}
	for _, s := range st.Services {
		sj := serviceJSON{
			Name: s.Name, Listen: s.Listen.String(), Protocol: string(s.Protocol), Balance: string(s.Balance),
			Unchecked: !s.Checked, RoutingToBackups: s.RoutingToBackups, Draining: st.Stopping, Accepted: s.Accepted, Refused: s.Refused, Errors: s.ProxyErrors, UDP: newUDPJSON(s.UDP), Backends: []backendJSON{},
		}
		if s.Protocol == config.TCP {
			sj.Rejected = map[string]uint64{}
			for reason, n := range s.Rejected {
				sj.Rejected[l4.RejectReason(reason).String()] = n
			}
		}
		for _, b := range s.Backends {
			bj := backendJSON{
				Address: b.Address.String(), Weight: b.Weight, Configured: b.Configured, Backup: b.Backup, InRoute: b.InRoute,
				Health: b.Health.Status.State.String(), LastFailure: b.Health.LastFailure,
				Active: b.Active, Total: b.Total, ConnectFailures: b.DialFailed,
				BytesToBackend: b.BytesToBack, BytesToClient: b.BytesToCli, Draining: b.Draining,
			}
			if h := b.Health.History; len(h) > 0 {
				last := h[len(h)-1]
				bj.LastTransition = &transitionJSON{From: last.From.String(), To: last.To.String(), Reason: last.Reason, At: last.At}
			}
			if b.Draining {
				deadline := b.DrainDeadline
				bj.DrainDeadline = &deadline
			}
			sj.Backends = append(sj.Backends, bj)
		}
		out.Services = append(out.Services, sj)
	}
	return out
}
