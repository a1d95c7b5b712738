// Command l4lb is an L4 (TCP) load balancer.
//
//	l4lb run -config /etc/l4lb/l4lb.toml     serve until SIGINT/SIGTERM
//	l4lb check -config /etc/l4lb/l4lb.toml   validate a config file
//	l4lb version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

const usage = `usage: l4lb <command> [flags]

commands:
  run     -config FILE [-log-level LEVEL]   run the load balancer
  check   -config FILE                      validate a config file; exit 1 listing every problem
  version                                   print the version
`

func main() {
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

func runMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stderr)
	case "check":
		return cmdCheck(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintf(stdout, "l4lb %s %s %s/%s\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "l4lb: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file to validate")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *path == "" {
		fmt.Fprintln(stderr, "l4lb check: -config FILE is required")
		return 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		printConfigError(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok (%d services)\n", *path, len(cfg.Services))
	return 0
}

// printConfigError prints every problem of a rejected file, with the
// offending source line under syntax errors.
func printConfigError(w io.Writer, err error) {
	var errs *config.Errors
	if !errors.As(err, &errs) {
		fmt.Fprintln(w, err)
		return
	}
	single := &config.Errors{Path: errs.Path}
	for _, p := range errs.Problems {
		single.Problems = []config.Problem{p}
		fmt.Fprintln(w, single.Error())
		if p.Context != "" {
			fmt.Fprintln(w, p.Context)
		}
	}
	fmt.Fprintf(w, "%d problem(s) found\n", len(errs.Problems))
}

func cmdRun(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file")
	level := fs.String("log-level", "info", "log level: trace, debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *path == "" {
		fmt.Fprintln(stderr, "l4lb run: -config FILE is required")
		return 2
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "l4lb", Level: hclog.LevelFromString(*level), Output: stderr})
	if log.GetLevel() == hclog.NoLevel {
		fmt.Fprintf(stderr, "l4lb run: unknown -log-level %q\n", *level)
		return 2
	}

	cfg, err := config.Load(*path)
	if err != nil {
		printConfigError(stderr, err)
		return 1
	}
	// Go itself raises the soft RLIMIT_NOFILE to the hard limit at start
	// (since Go 1.19); each proxied connection costs two descriptors.

	// Signals are subscribed before listeners bind, so that a SIGHUP or
	// SIGTERM arriving during start-up is handled, not fatal.
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)

	srv := l4.NewServer(log)
	if err := srv.Apply(context.Background(), cfg); err != nil {
		log.Error("cannot start", "error", err)
		return 1
	}
	log.Info("ready", "version", version, "config", *path, "services", len(cfg.Services))

	for sig := range signals {
		if sig == syscall.SIGHUP {
			reload(log, srv, *path)
			continue
		}
		log.Info("stopping: no new connections; open ones may finish within drain_timeout", "signal", sig.String())
		srv.Shutdown()
		log.Info("stopped")
		return 0
	}
	return 0
}

// reload applies the config file again; a bad file leaves the running
// config in place.
func reload(log hclog.Logger, srv *l4.Server, path string) {
	cfg, err := config.Load(path)
	if err != nil {
		log.Error("reload rejected, keeping the running config", "error", err)
		return
	}
	if err := srv.Apply(context.Background(), cfg); err != nil {
		log.Error("reload rejected, keeping the running config", "error", err)
		return
	}
	log.Info("reloaded", "config", path)
}
