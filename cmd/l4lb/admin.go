package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

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

	mu     sync.Mutex // guards addr, server and started
	addr   string
	server *http.Server
	// started: the first commit, at start, is done; reloads come after.
	started bool
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
		case errors.Is(err, errStopping):
			res.Error = err.Error()
			w.WriteHeader(http.StatusServiceUnavailable)
		case err != nil:
			res.Error = err.Error()
			w.WriteHeader(http.StatusUnprocessableEntity)
		}
		json.NewEncoder(w).Encode(res)
	})
	mux.HandleFunc("/reload", func(w http.ResponseWriter, r *http.Request) {
		// Any other method than POST: without this, "/" below would
		// answer, offering GET.
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "reload with POST /reload", http.StatusMethodNotAllowed)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "the admin endpoint is read-only, except POST /reload", http.StatusMethodNotAllowed)
			return
		}
		http.NotFound(w, r)
	})
	return &admin{log: log, handler: mux}
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
// nothing to bind.
func (a *admin) prepare(addr string) (net.Listener, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if addr == a.addr || addr == "" {
		return nil, nil
	}
	ln, err := listenTCP(addr)
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

// commit serves on ln (from prepare) at addr and stops the old server;
// with addr "" it only stops the old one.
func (a *admin) commit(addr string, ln net.Listener) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.started = true
	if addr == a.addr {
		return
	}
	if a.server != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		a.server.Shutdown(ctx)
		cancel()
		a.server = nil
	}
	a.addr = addr
	if ln == nil {
		a.log.Info("admin endpoint disabled")
		return
	}
	a.server = &http.Server{Handler: a.handler, ReadHeaderTimeout: 5 * time.Second}
	go a.server.Serve(ln)
	a.log.Info("admin endpoint listening", "listen", ln.Addr().String())
}

func (a *admin) close() { a.commit("", nil) }

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
		FlowsAnswered: st.FlowsAnswered, FlowsClosed: st.FlowsClosed, FlowsRefused: st.FlowsRefused, Drops: map[string]uint64{},
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
