package main

import (
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"runtime"

	"github.com/l4lb/l4lb/config"
)

// raiseNofile raises the soft RLIMIT_NOFILE to the hard limit and returns
// the soft limit in force. Go's runtime does the same at start (since Go
// 1.19), but only for itself: doing it here says so in l4lb's own code,
// and the returned figure sizes the connection bound below.
func raiseNofile() (soft, hard uint64, err error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, 0, err
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = raised.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &raised); err != nil {
			return lim.Cur, lim.Max, err
		}
		lim = raised
	}
	return lim.Cur, lim.Max, nil
}

// Descriptor budget of maxConnectionsFor.
const (
	// fdReserve is kept for everything that is not a proxied connection:
	// stdio, the netpoller, listening sockets, the admin endpoint, inotify,
	// health probes (one per backend at a time), config reloads, and the
	// one connection each acceptor may hold while it waits at the bound.
	// The event loops' epoll, eventfd and io_uring descriptors (three per
	// core) come on top: see maxConnectionsFor.
	fdReserve = 64
	// pipePoolFDs is what the idle pipes of the splice pool may hold at
	// most (maxIdlePipes = 128 pipes of two descriptors).
	pipePoolFDs = 256
	// fdsPerConnection: two sockets, plus a third for pipes: a connection
	// borrows a pipe (two descriptors) only while it splices a bulk
	// transfer, which HAProxy's sizing also assumes of a fraction of its
	// connections (maxpipes = maxconn/4).
	fdsPerConnection = 3
)

// maxConnectionsFor is the bound on open TCP connections that keeps l4lb
// within nofile descriptors: at it, l4lb stops accepting until a
// connection closes, and the connections it has keep the descriptors they
// need (see l4.Server.SetMaxConnections). UDP flows take a descriptor each
// and are bounded by max_flows, not by this.
func maxConnectionsFor(nofile uint64) int64 {
	reserve := fdReserve + 3*uint64(runtime.GOMAXPROCS(0)) + min(pipePoolFDs, nofile/8)
	if nofile <= reserve+fdsPerConnection {
		return 1
	}
	return int64((nofile - reserve) / fdsPerConnection)
}

// flowDescriptorShortfall is how many descriptors the UDP services of cfg
// would lack with all their flows open (one socket each, up to max_flows)
// and no TCP connection at all; 0 when they fit. TCP connections and UDP
// flows share the descriptors first come, first served; this only catches
// a max_flows that can never be reached.
func flowDescriptorShortfall(cfg *config.Config, nofile uint64) int64 {
	var flows int64
	for _, sc := range cfg.Services {
		if sc.Protocol == config.UDP {
			flows += int64(sc.MaxFlows)
		}
	}
	return max(0, flows-(int64(nofile)-fdReserve))
}

// warnFlowDescriptors says so when max_flows cannot be reached: past the
// limit, new flows fail to open (dropped as backend_socket) and TCP
// connections may find no pipe. Raising the limit or lowering max_flows is
// the operator's call, not something to guess at here. It warns when the
// shortfall differs from the one warned of before (*warned), so that
// reloads that do not change it repeat nothing.
func warnFlowDescriptors(log hclog.Logger, cfg *config.Config, nofile uint64, warned *int64) {
	short := flowDescriptorShortfall(cfg, nofile)
	if short > 0 && short != *warned {
		log.Warn("udp max_flows exceed RLIMIT_NOFILE: raise it (LimitNOFILE= under systemd) or lower max_flows",
			"nofile", nofile, "descriptors_short", short)
	}
	*warned = short
}
