package main

import (
	"errors"
	"net"
	"net/http"
	"net/http/pprof"

	"github.com/hashicorp/go-hclog"
)

// startPprof serves Go's profiles (/debug/pprof/) on addr, for the
// measurements of docs/performance.md. It is off unless `l4lb run -pprof
// ADDR` asks for it, on a listener of its own: profiles show internals and
// cost CPU while taken, so they are not part of the admin endpoint. Like
// the admin endpoint it has no authentication: keep it on loopback.
func startPprof(addr string, log hclog.Logger) error {
	ln, err := listenTCP(addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	log.Info("serving Go profiles", "listen", ln.Addr().String(), "path", "/debug/pprof/")
	go func() {
		if err := http.Serve(ln, mux); err != nil && !errors.Is(err, net.ErrClosed) {
			log.Error("pprof endpoint stopped", "error", err)
		}
	}()
	return nil
}
