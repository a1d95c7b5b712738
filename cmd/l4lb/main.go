// Command l4lb is an L4 (TCP and UDP) load balancer.
//
//	l4lb run -config /etc/l4lb/l4lb.toml     serve until SIGINT/SIGTERM/SIGQUIT; SIGHUP reloads
//	l4lb check -config /etc/l4lb/l4lb.toml   validate a config file
//	l4lb version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

const usage = `usage: l4lb <command> [flags]

commands:
  run     -config FILE [-log-level LEVEL] [-pidfile FILE]   run the load balancer
  check   FILE | -config FILE               validate a config file; exit 1 listing every problem
  status  [-admin ADDR] [-json]             show services and backends of a running l4lb
  reload  [-admin ADDR | -pidfile FILE]     reload a running l4lb's config (POST /reload, or SIGHUP)
  upgrade [-admin ADDR | -pidfile FILE]     have the binary at a running l4lb's path take over from it (POST /upgrade, or SIGUSR2)
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
	case "status":
		return cmdStatus(args[1:], stdout, stderr)
	case "reload":
		return cmdReload(args[1:], stdout, stderr)
	case "upgrade":
		return cmdUpgrade(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintf(stdout, "l4lb %s %s %s/%s\n", buildVersion(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "l4lb: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

// parseArgs parses a subcommand's flags and allows at most positional
// arguments besides. When ok is false the command ends with code: 0 after
// -h, 2 for a bad flag or an argument nothing takes.
func parseArgs(fs *flag.FlagSet, args []string, stderr io.Writer, positional int) (rest []string, code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, 0, false
		}
		return nil, 2, false
	}
	if fs.NArg() > positional {
		fmt.Fprintf(stderr, "l4lb %s: unexpected argument %q\n", fs.Name(), fs.Arg(positional))
		return nil, 2, false
	}
	return fs.Args(), 0, true
}

// buildVersion is version, or for a build not given one, "dev-" and the
// commit Go recorded from the source tree ("-dirty" with local changes).
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if version != "dev" || !ok {
		return version
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch {
		case s.Key == "vcs.revision":
			rev = s.Value[:min(12, len(s.Value))]
		case s.Key == "vcs.modified" && s.Value == "true":
			dirty = "-dirty"
		}
	}
	if rev == "" {
		return version
	}
	return "dev-" + rev + dirty
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file to validate (or give it as the argument: l4lb check FILE)")
	rest, code, ok := parseArgs(fs, args, stderr, 1)
	if !ok {
		return code
	}
	if len(rest) == 1 {
		if *path != "" {
			fmt.Fprintln(stderr, "l4lb check: give the file once, as -config FILE or as the argument")
			return 2
		}
		*path = rest[0]
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
	if cfg.Process.User != "" {
		// A warning, not a failure: a file checked in CI or on a build
		// host names a user that may exist only where l4lb runs. run
		// refuses to start without it.
		if _, err := processIDs(cfg.Process); err != nil {
			fmt.Fprintf(stderr, "%s: warning: %v (l4lb run would refuse to start on this host)\n", *path, err)
		}
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
	levelFlag := fs.String("log-level", "", "log level, overriding [log] level: trace, debug, info, warn, error")
	pidfile := fs.String("pidfile", "", "write the process id to `file`, where l4lb reload -pidfile reads it")
	pprofAddr := fs.String("pprof", "", "serve Go profiles (/debug/pprof/) on this address, e.g. 127.0.0.1:6060; off by default")
	noIOURing := fs.Bool("no-io-uring", false, "make TCP reads and writes one system call each (read(2), write(2)) instead of batching them with io_uring")
	if _, code, ok := parseArgs(fs, args, stderr, 0); !ok {
		return code
	}
	if *path == "" {
		fmt.Fprintln(stderr, "l4lb run: -config FILE is required")
		return 2
	}
	if *levelFlag != "" && hclog.LevelFromString(*levelFlag) == hclog.NoLevel {
		fmt.Fprintf(stderr, "l4lb run: unknown -log-level %q\n", *levelFlag)
		return 2
	}
	// First, before anything else takes a descriptor: the ones an upgrade
	// passed are marked close-on-exec here.
	inherited, err := inheritedFromEnv()
	if err != nil {
		fmt.Fprintf(stderr, "l4lb run: upgrade: %v\n", err)
		return 1
	}
	binaryPath, binaryPathErr := ownPath()
	// Signals are subscribed this early so that none of them kills l4lb
	// with Go's default action: a SIGUSR2 meant for the process this one
	// upgrades from, say, or a SIGHUP or SIGTERM arriving during start-up,
	// which are handled once the listeners are bound.
	signals := make(chan os.Signal, 4)
	// SIGQUIT stops as SIGTERM does, as it stops nginx gracefully, rather
	// than Go's default of a goroutine dump and an exit that cuts every
	// connection.
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGUSR2)
	// The file is watched before it is read: a change made while l4lb
	// starts (the first health checks alone may take 2 s) is then pending
	// once the reloads begin, rather than lost. The watch runs whatever
	// [reload] watch says, so that a reload can switch it on.
	watcher, watchErr := config.NewWatcher(*path)
	if watchErr == nil {
		defer watcher.Close()
	}
	cfg, err := config.Load(*path)
	if err != nil {
		printConfigError(stderr, err)
		return 1
	}
	if cfg.Process.User != "" {
		// Whether l4lb can become the user too: a process an upgrade
		// started runs as the one the old process dropped root for, and
		// failing only at dropPrivileges, after its first Apply, would
		// cut the clients it had accepted from the shared sockets.
		acct, err := processIDs(cfg.Process)
		if err == nil {
			err = canBecome(cfg.Process, acct)
		}
		if err != nil {
			fmt.Fprintf(stderr, "l4lb run: %s: %v\n", *path, err)
			return 1
		}
	}
	var pidLock *os.File
	// pidWritten: an upgrade passed the pidfile on, and the process that
	// started this one writes this one's pid once it is ready.
	pidWritten := false
	if *pidfile != "" {
		if pidLock, err = inherited.takePidfile(); err == nil && pidLock == nil {
			pidLock, err = lockPidfile(*pidfile)
		} else {
			pidWritten = pidLock != nil
		}
		if err != nil {
			fmt.Fprintf(stderr, "l4lb run: -pidfile: %v\n", err)
			return 1
		}
		defer pidLock.Close()
	}
	if *levelFlag != "" {
		cfg.Log.Level = *levelFlag // and on each reload (reloader.logLevel)
	}
	log := hclog.New(&hclog.LoggerOptions{
		Name: "l4lb", Output: stderr, JSONFormat: cfg.Log.Format == "json",
		Level: hclog.LevelFromString(cfg.Log.Level),
	})
	if *pprofAddr != "" {
		if err := startPprof(*pprofAddr, log); err != nil && inherited != nil {
			// The process that started this one holds the address until
			// it exits; its drain may be long, and profiles are not worth
			// failing the upgrade for.
			log.Warn("profiles are not served: the process this one upgraded holds the address", "error", fmt.Errorf("pprof listen %s: %w", *pprofAddr, err))
		} else if err != nil {
			log.Error("cannot start", "error", fmt.Errorf("pprof listen %s: %w", *pprofAddr, err))
			return 1
		}
	}
	nofile, hardNofile, err := raiseNofile()
	if err != nil {
		log.Warn("cannot raise the soft RLIMIT_NOFILE to the hard limit", "error", err)
	}

	if *noIOURing {
		l4.DisableIOURing()
	}
	if batching, err := l4.IOURing(); batching {
		log.Info("TCP reads and writes are batched with io_uring")
	} else if err != nil {
		log.Warn("io_uring is unavailable: TCP reads and writes go one system call each, which costs CPU per message", "error", err)
	} else {
		log.Info("TCP reads and writes go one system call each (-no-io-uring)")
	}
	if slices.ContainsFunc(cfg.Services, func(sc config.Service) bool { return sc.Protocol == config.UDP }) {
		if on, why := l4.UDPSegmentation(); on {
			log.Info("UDP datagrams of a batch to one destination go as one segmented send (UDP GSO)")
		} else {
			log.Info("UDP datagrams go one by one: no segmentation", "reason", why)
		}
	}
	srv := l4.NewServer(log)
	if inherited != nil {
		srv.Adopt(inherited.sockets)
	}
	if inherited.onSocket() {
		srv.HoldInheritedUDP()
	}
	// The shortfall last warned of: start and each reload share it (reloads
	// run one at a time, after start).
	var flowShortfall int64
	srv.SetLogConnections(cfg.Log.Connections)
	if nofile > 0 {
		maxConns := maxConnectionsFor(nofile)
		srv.SetMaxConnections(maxConns)
		log.Info("descriptor limit", "nofile", nofile, "nofile_hard", hardNofile, "max_connections", maxConns)
		warnFlowDescriptors(log, cfg, nofile, &flowShortfall)
	}
	notify := newNotifier()
	// ctx ends when l4lb begins to stop: the reloads end with it, and one
	// under way starts no new service.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rl := &reloader{path: *path, srv: srv, log: log, notify: notify, logLevel: *levelFlag, done: ctx, applied: func(c *config.Config) {
		log.SetLevel(hclog.LevelFromString(c.Log.Level))
		srv.SetLogConnections(c.Log.Connections)
		if nofile > 0 {
			warnFlowDescriptors(log, c, nofile, &flowShortfall)
		}
	}}
	adm := newAdmin(log, srv, rl)
	adminLn := inherited.takeAdmin(cfg.Admin.Listen)
	if adminLn == nil {
		// Within: err may still hold raiseNofile's, only a warning.
		if adminLn, err = adm.prepare(cfg.Admin.Listen); err != nil {
			log.Error("cannot start", "error", err)
			return 1
		}
	}
	// The first Apply waits for the services' first health checks, up to
	// 2 s; a stop signal ends that wait rather than being read after it.
	startCtx, interruptStart := context.WithCancel(ctx)
	defer interruptStart()
	applied := make(chan error, 1)
	go func() {
		_, err := srv.Apply(startCtx, cfg)
		applied <- err
	}()
	stopSignal, pending, err := awaitStart(applied, signals, interruptStart)
	if err != nil {
		log.Error("cannot start", "error", err)
		return 1
	}
	if inherited == nil {
		adm.commit(cfg.Admin.Listen, adminLn)
		rl.admin = adm
	}

	// handedOver: an upgrade's new process serves now; this one drains.
	// flowsTo is the socket to pass it the UDP flows over.
	handedOver := false
	var flowsTo *net.UnixConn
	// speaksForService: systemd takes this process's word for the unit's.
	// One an upgrade started does not until it is the main process: with
	// NotifyAccess=all, a STOPPING=1 from it before that (the old one
	// stops it at upgradeTimeout, say) would stop the unit, and with it
	// the old process that serves on.
	speaksForService := inherited == nil
	// stop drains and exits; a second stop signal meanwhile exits at once.
	stop := func(sig os.Signal) int {
		if handedOver {
			log.Info("upgraded: the new process serves; this one no longer accepts, and its open connections may finish within drain_timeout")
			// First: the new process reads no UDP datagram until its
			// flows are in, and closing the admin endpoint below may
			// wait for its requests in progress.
			handOverFlows(srv, flowsTo, log)
			// The endpoint is the new process's alone from now on.
			adm.close()
			// And the pidfile's lock: this one accepts no more, and an
			// l4lb started should the new one die must not wait for
			// this drain.
			if pidLock != nil {
				pidLock.Close()
			}
			notify.quiet()
		} else {
			log.Info("stopping: no new connections; open ones may finish within drain_timeout", "signal", sig.String())
			// STOPPING=1 first: a reload under way sends no READY=1 after
			// it. Not after an upgrade: the new process is systemd's
			// main process now.
			if !speaksForService {
				notify.quiet()
			} else if err := notify.stopping(); err != nil {
				log.Warn("cannot notify systemd", "error", err)
			}
		}
		cancel() // a reload under way starts no new service
		drained := make(chan struct{})
		go func() {
			rl.stop() // after a reload in progress: no Apply during the drain
			srv.Shutdown()
			close(drained)
		}()
		for {
			select {
			case <-drained:
				adm.close()
				log.Info("stopped")
				return 0
			case sig := <-signals:
				if sig == syscall.SIGHUP || sig == syscall.SIGUSR2 {
					log.Info("stopping: signal ignored", "signal", sig.String())
					continue
				}
				// Whoever sends a second one will not wait for the drain:
				// the exit closes every socket.
				log.Warn("stopping now: closing every open connection", "signal", sig.String(),
					"connections", openConnections(srv))
				return 0
			}
		}
	}
	// failServing ends a start that failed after the services took their
	// first clients: they drain as at a stop, rather than being reset by
	// the exit.
	failServing := func(msg string, err error) int {
		log.Error(msg, "error", err)
		inherited.abandon()
		stop(syscall.SIGTERM)
		return 1
	}
	if stopSignal != nil {
		// Stopped while starting: the services that were still waiting
		// for their first checks were dropped; the rest drain. Neither the
		// log nor systemd hears that l4lb was ready.
		return stop(stopSignal)
	}
	// The pidfile goes where root may write (/run), so before the drop;
	// removing it at exit may then fail, as with other daemons that drop
	// privileges, and a stale file names a dead process.
	if pidLock != nil {
		if !pidWritten {
			if err := writePid(pidLock); err != nil {
				return failServing("cannot write pidfile", err)
			}
		}
		defer func() {
			if !handedOver { // the new process's pid is in it now
				os.Remove(*pidfile)
			}
		}()
	}
	if err := dropPrivileges(cfg.Process); err != nil {
		return failServing("cannot start", err)
	}
	if cfg.Process.User != "" {
		groups, _ := os.Getgroups()
		log.Info("running unprivileged", "uid", os.Getuid(), "gid", os.Getgid(), "groups", groups)
	}

	triggers := make(chan string, 8)
	go rl.run(ctx, triggers)
	switch {
	case inherited == nil:
		err = notify.ready("serving")
	case !inherited.onSocket():
		// An l4lb that names no successor to systemd: this one names
		// itself, and may be stopped by it at upgradeTimeout just then.
		err = notify.readyAsMain("serving")
		speaksForService = true
	}
	if err != nil {
		log.Warn("cannot notify systemd", "error", err)
	}
	if err := inherited.sayReady(); err != nil {
		// It hears of it when it waits no more, and keeps serving: both
		// then serve from the same sockets.
		log.Error("upgrade: cannot tell the process that started this one that it is ready", "error", err)
	}
	// The old process names this one systemd's main process once it has
	// read that it is ready, when it can no longer stop it, and then
	// passes its UDP flows.
	if inherited.takeFlows(srv, log) {
		speaksForService = true
	}
	if inherited != nil {
		// Only now, on the shared admin socket: a reload or an upgrade
		// asked of this process before it was ready would be lost with
		// it, should it fail.
		adm.commit(cfg.Admin.Listen, adminLn)
		rl.admin = adm
	}
	log.Info("ready", "version", buildVersion(), "config", *path, "config_version", 1, "hash", cfg.Hash[:12], "services", len(cfg.Services))
	// After READY=1: a change made during start-up then reloads after it.
	if watchErr != nil {
		if cfg.Reload.Watch {
			log.Error("cannot watch the config file; reload with SIGHUP", "error", watchErr)
		}
	} else {
		go forwardChanges(watcher, srv, triggers)
	}

	up := &upgrader{log: log, srv: srv, adm: adm, rl: rl, path: binaryPath, args: os.Args[1:], pidfile: pidLock, notify: notify}
	if binaryPathErr != nil {
		up.path = ""
	}
	handOver := func(res upgradeResult) int {
		handedOver = true
		flowsTo = res.flows
		return stop(syscall.SIGUSR2)
	}
	return serveUntilStop(log, signals, pending, triggers, adm.upgrades, up, stop, handOver)
}

// serveUntilStop handles the signals and upgrade requests of a running
// l4lb: SIGHUP asks triggers for a reload, SIGUSR2 and each request of
// upgrades run an upgrade, any other signal stops l4lb. It returns
// stop's exit code, or handOver's once an upgrade's new process serves.
func serveUntilStop(log hclog.Logger, signals <-chan os.Signal, pending []os.Signal, triggers chan<- string,
	upgrades <-chan chan<- upgradeResult, up *upgrader, stop func(os.Signal) int, handOver func(upgradeResult) int) int {
	var upgrading *upgrade
	var upgradeDone <-chan upgradeResult
	// upgradeWaiters are the POST /upgrade requests of the upgrade under
	// way; hupDuringUpgrade: a SIGHUP came meanwhile, for the new
	// process to reload should the upgrade succeed (the reload it asked
	// for here waits for the upgrade, and is refused after one).
	var upgradeWaiters []chan<- upgradeResult
	hupDuringUpgrade := false
	startUpgrade := func() {
		if upgrading == nil {
			upgrading = up.start()
			upgradeDone = upgrading.done
		} else {
			log.Info("upgrade: one is already under way")
		}
	}
	handle := func(sig os.Signal) (stopping bool) {
		switch sig {
		case syscall.SIGHUP:
			if upgrading != nil {
				hupDuringUpgrade = true
			}
			select {
			case triggers <- "SIGHUP":
			default: // plenty of reloads already pending
			}
		case syscall.SIGUSR2:
			startUpgrade()
		default:
			return true
		}
		return false
	}
	for _, sig := range pending {
		handle(sig)
	}
	for {
		select {
		case sig := <-signals:
			if handle(sig) {
				if upgrading != nil {
					// Its end comes at once (cancel ends its waits), or
					// once a reload under way is done, which the stop
					// would wait for anyway. It may have succeeded just
					// before: then the new process serves, and the stop
					// asked of l4lb is its to make.
					upgrading.cancel()
					res := <-upgradeDone
					if res.err == nil {
						for _, w := range upgradeWaiters {
							w <- res
						}
						log.Info("upgrade: the new process is ready; passing on the stop signal that came with it", "pid", res.pid, "signal", sig.String())
						syscall.Kill(res.pid, sig.(syscall.Signal))
						return handOver(res)
					}
					for _, w := range upgradeWaiters {
						w <- upgradeResult{pid: res.pid, err: errUpgradeCancelled}
					}
				}
				return stop(sig)
			}
		case reply := <-upgrades:
			startUpgrade()
			upgradeWaiters = append(upgradeWaiters, reply)
		case res := <-upgradeDone:
			upgrading, upgradeDone = nil, nil
			for _, w := range upgradeWaiters {
				w <- res
			}
			upgradeWaiters = nil
			if res.err != nil {
				log.Error("upgrade failed: still serving", "error", res.err)
				hupDuringUpgrade = false
				continue
			}
			log.Info("upgrade: the new process is ready", "pid", res.pid)
			if hupDuringUpgrade {
				log.Info("upgrade: passing on the SIGHUP that came during it", "pid", res.pid)
				syscall.Kill(res.pid, syscall.SIGHUP)
			}
			return handOver(res)
		}
	}
}

// awaitStart waits for the first Apply to end (applied). A stop signal
// meanwhile interrupts it (its context ends, and the services still
// waiting for their first checks are dropped) and is returned once it
// has ended; later signals stay in signals, where the stop reads them. A
// SIGHUP or SIGUSR2 meanwhile is returned in pending, to reload or
// upgrade once l4lb is ready.
func awaitStart(applied <-chan error, signals <-chan os.Signal, interrupt func()) (stop os.Signal, pending []os.Signal, err error) {
	for {
		select {
		case err := <-applied:
			return nil, pending, err
		case sig := <-signals:
			if sig == syscall.SIGHUP || sig == syscall.SIGUSR2 {
				if !slices.Contains(pending, sig) {
					pending = append(pending, sig)
				}
				continue
			}
			interrupt()
			return sig, pending, <-applied
		}
	}
}

// openConnections counts every connection and UDP flow a stop that does
// not wait closes, without waiting for a reload in progress.
func openConnections(srv *l4.Server) int64 {
	conns, flows := srv.OpenConnections()
	return conns + flows
}

// forwardChanges turns changes of the config file into reload triggers
// while the running config has [reload] watch = true, until the watcher
// is closed.
func forwardChanges(w *config.Watcher, srv *l4.Server, triggers chan<- string) {
	for range w.Changes() {
		if _, cfg, _ := srv.Version(); cfg.Reload.Watch {
			select {
			case triggers <- triggerFile:
			default: // a reload is already pending
			}
		}
	}
}
