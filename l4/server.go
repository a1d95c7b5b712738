package l4

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/listener"
)

// Server runs every service of a config: their listeners, accept loops and
// proxied connections.
//
//	srv := l4.NewServer(logger)
//	if err := srv.Apply(ctx, cfg); err != nil { ... } // binds, then serves
//	...
//	srv.Shutdown() // stops accepting, drains, returns when all is closed
type Server struct {
	log   hclog.Logger
	pipes pipePool

	mu sync.Mutex // guards running and closed
	// running is keyed by service name.
	running map[string]*runningService
	closed  bool
}

type runningService struct {
	svc       *Service
	cfg       *config.Service
	listeners []*net.TCPListener
	accepting sync.WaitGroup // accept loops
}

// NewServer returns a server with no services.
func NewServer(log hclog.Logger) *Server {
	return &Server{log: log, running: make(map[string]*runningService)}
}

// Apply makes cfg the running config. Every new listener is bound before
// anything changes; if one cannot be bound, Apply closes what it bound and
// returns the error with the running services untouched.
func (srv *Server) Apply(ctx context.Context, cfg *config.Config) error {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.closed {
		return errors.New("server is shut down")
	}
	bound := make(map[string][]*net.TCPListener)
	for i := range cfg.Services {
		sc := &cfg.Services[i]
		if old := srv.running[sc.Name]; old != nil && sameSockets(old.cfg, sc) {
			continue
		}
		lns, err := listener.ListenTCP(ctx, sc.Listen, sc.Workers)
		if err != nil {
			for _, lns := range bound {
				closeListeners(lns)
			}
			return fmt.Errorf("services.%s: %w", sc.Name, err)
		}
		bound[sc.Name] = lns
	}

	wanted := make(map[string]bool, len(cfg.Services))
	for i := range cfg.Services {
		sc := &cfg.Services[i]
		wanted[sc.Name] = true
		old := srv.running[sc.Name]
		if lns, isNew := bound[sc.Name]; isNew {
			if old != nil {
				srv.retire(old)
			}
			rs := &runningService{svc: NewService(sc, &srv.pipes, srv.log), cfg: sc, listeners: lns}
			srv.running[sc.Name] = rs
			srv.serve(rs)
			srv.log.Info("service started", "service", sc.Name, "listen", sc.Listen, "protocol", sc.Protocol,
				"balance", sc.Balance, "workers", sc.Workers, "backends", backendList(sc))
			continue
		}
		old.cfg = sc
		old.svc.Update(sc)
	}
	for name, rs := range srv.running {
		if !wanted[name] {
			srv.retire(rs)
			delete(srv.running, name)
		}
	}
	return nil
}

// sameSockets reports whether a service's sockets can stay as they are.
func sameSockets(a, b *config.Service) bool {
	return a.Listen == b.Listen && a.Protocol == b.Protocol && a.Workers == b.Workers
}

func (srv *Server) serve(rs *runningService) {
	for _, ln := range rs.listeners {
		rs.accepting.Add(1)
		go func() {
			defer rs.accepting.Done()
			listener.Serve(ln, rs.svc.Handle, srv.log.With("service", rs.cfg.Name))
		}()
	}
}

// retire stops a service accepting and drains its connections in the
// background, for its drain_timeout.
func (srv *Server) retire(rs *runningService) {
	closeListeners(rs.listeners)
	go func() {
		rs.accepting.Wait()
		rs.svc.Drain(time.Now().Add(rs.cfg.DrainTimeout))
		srv.log.Info("service stopped", "service", rs.cfg.Name, "listen", rs.cfg.Listen)
	}()
}

// Shutdown stops accepting on every service, lets open connections finish
// for up to each service's drain_timeout, closes the rest and returns when
// every connection is closed.
func (srv *Server) Shutdown() {
	srv.mu.Lock()
	srv.closed = true
	running := srv.running
	srv.running = nil
	srv.mu.Unlock()

	var wg sync.WaitGroup
	for _, rs := range running {
		closeListeners(rs.listeners)
	}
	for _, rs := range running {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rs.accepting.Wait()
			rs.svc.Drain(time.Now().Add(rs.cfg.DrainTimeout))
		}()
	}
	wg.Wait()
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

func closeListeners(lns []*net.TCPListener) {
	for _, ln := range lns {
		ln.Close()
	}
}

func backendList(sc *config.Service) []string {
	out := make([]string, len(sc.Backends))
	for i, b := range sc.Backends {
		out[i] = fmt.Sprintf("%s(w=%d)", b.Address, b.Weight)
	}
	return out
}
