package l4

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// proxyConn is one client connection joined to one backend connection,
// run by one event loop (loop.go) from accept to close:
//
//	stateHeader     reading the PROXY header of a trusted balancer
//	stateConnecting a non-blocking connect to a backend is in flight
//	stateOpen       bytes move both ways (copy.go)
//	stateClosed     both sockets closed, everything given back
//
// Only its loop touches it, except forced (closeConns) and the links in
// its backend's list (under the backend's mu) or, while it reads its
// PROXY header, in its service's waiting list (under waitingMu).
type proxyConn struct {
	loop  *eventLoop
	svc   *Service
	route *route
	peer  peer
	state connState

	client, backend int // descriptors; backend is -1 between dials
	slot            int32
	// backendTag is the epoll tag of the current backend socket: a new
	// one per dial (see loop.go).
	backendTag int32
	cl, be     sockFlags

	up   direction // client to backend
	down direction // backend to client

	target *Backend
	// Dial progress, kept across the connects of one connection: the
	// hash key, the backends tried, how many were dialed and how many were
	// skipped for being full, and how many times the connection started
	// over on a newer route (a chosen backend retired mid-dial, or every
	// backend of its route tried: moveToCurrentRoute).
	key       uint64
	triedBuf  [8]int
	tried     []int
	dials     int
	full      int
	restarts  int
	dialStart int64

	idleTimeout time.Duration
	// halfCloseTimeout replaces idleTimeout, when shorter, once one
	// direction has passed on its EOF (halfClosed): see startHalfClose.
	halfCloseTimeout time.Duration
	halfClosed       bool
	// lastActive is when a byte last moved either way (monotonicNow).
	lastActive int64
	opened     int64
	// queuedToClient and queuedToBackend are the bytes the kernel held in
	// each socket's send queue when the idle timer last fired: see
	// kernelStillSending.
	queuedToClient, queuedToBackend int64

	timerAt    int64
	timerIndex int

	// writeErr is the first write that found its peer gone (writeFailed):
	// the connection ends with it once the other way has passed on what
	// that peer sent before.
	writeErr error

	// forced is set when l4lb itself cut the connection (a drain deadline,
	// shutdown, a backend marked down, a failback), for the connection log.
	forced atomic.Bool

	// Links in target.conns, guarded by target.mu; before that, while
	// peer.headerDue, in svc.waiting, guarded by svc.waitingMu.
	prev, next *proxyConn
}

type connState uint8

const (
	stateHeader connState = iota
	stateConnecting
	stateOpen
	stateClosed
)

// sockFlags is what a socket's events said, and the calls since left
// true. readUntilEAGAIN is set once a short read may no longer mean the
// socket is empty: the peer's FIN came (read returns the last bytes, and
// the EOF only on the next call), or urgent data (read stops at the
// urgent mark with bytes queued behind it). urgent is set by urgent data
// and cleared when splicing hands the socket back to read(2), the only
// call that passes the urgent mark (see fillPipe).
type sockFlags struct{ readable, writable, readUntilEAGAIN, urgent bool }

func (f *sockFlags) update(events uint32) {
	if events&(unix.EPOLLIN|unix.EPOLLPRI|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		f.readable = true
	}
	if events&(unix.EPOLLPRI|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		f.readUntilEAGAIN = true
	}
	if events&unix.EPOLLPRI != 0 {
		f.urgent = true
	}
	if events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		f.writable = true
	}
}

// errConnectTimeout ends a connect that took longer than connect_timeout.
var errConnectTimeout = errors.New("connect timed out")

// abort ends the connection from any goroutine: its loop closes it.
func (c *proxyConn) abort() { c.loop.postAbort(c) }

// begin starts a connection its acceptor admitted, on the same loop.
func (c *proxyConn) begin() {
	l := c.loop
	if c.peer.headerDue {
		// Before anything can finish it: finish takes it off.
		c.svc.startWaiting(c)
	}
	c.slot = l.takeSlot(c)
	if err := l.register(c.client, c.slot, 0); err != nil {
		c.svc.refuse(c.peer.src, "cannot watch the client socket: "+err.Error())
		c.finish(nil)
		return
	}
	if c.peer.headerDue {
		c.state = stateHeader
		l.schedule(c, l.now+int64(c.svc.route.Load().cfg.ProxyProtocolTimeout))
		return
	}
	c.startRoute()
}

// startRoute dials on the current route, from its first choice.
func (c *proxyConn) startRoute() {
	r := c.svc.route.Load()
	c.route = r
	if r.balancer == nil {
		c.svc.refuse(c.peer.src, noRouteReason(r.cfg))
		c.finish(nil)
		return
	}
	c.key = clientKey(c.peer.src, r.cfg.HashKey)
	c.tried = c.triedBuf[:0]
	c.dials, c.full = 0, 0
	c.dialNext()
}

// dialNext starts a connect to the key's next choice, skipping backends
// that have their max_connections open, or ends the connection when no
// backend is left to try, on its route or the one published since.
func (c *proxyConn) dialNext() {
	s, r := c.svc, c.route
	c.state = stateConnecting
	if s.cut.Load() {
		// The service's drain deadline has passed (a PROXY header that
		// completed only now, or a retry): open nothing more.
		c.forced.Store(true)
		c.finish(errAborted)
		return
	}
	for {
		for c.dials < maxDialAttempts && len(c.tried) < len(r.backends) {
			i := r.balancer.pick(c.key, c.tried)
			if i < 0 {
				break
			}
			c.tried = append(c.tried, i)
			be := r.backends[i]
			// The connection counts as the backend's from before the dial, so
			// that a reload removing the backend mid-dial sees it and drains it
			// (and least_conn sees connections still being set up). The same
			// add reserves a max_connections slot, so that racing connects
			// cannot overshoot it.
			if n := be.active.Add(1); r.backendMax != nil && r.backendMax[i] > 0 && n > r.backendMax[i] {
				be.active.Add(-1)
				c.full++
				continue
			}
			c.dials++
			c.dialStart = monotonicNow()
			fd, err := startConnect(be.addr)
			if err == nil {
				c.backendTag += 2
				if err = c.loop.register(fd, c.slot, c.backendTag|1); err != nil {
					rawClose(fd)
				}
			}
			if err == nil {
				c.backend, c.target = fd, be
				c.loop.schedule(c, c.loop.now+int64(r.cfg.ConnectTimeout))
				return
			}
			be.active.Add(-1)
			if !c.dialFailed(be, err) {
				return
			}
		}
		if c.dials >= maxDialAttempts || !c.moveToCurrentRoute() {
			break
		}
		r = c.route
	}
	if c.dials == 0 && c.full > 0 {
		s.countReject(c.peer.src, RejectBackendsFull, nil)
	} else {
		s.refuse(c.peer.src, "every backend tried failed to connect")
	}
	c.finish(nil)
}

// moveToCurrentRoute carries a connection that has tried every backend
// of its route over to the route published since, if there is one, with
// the backends it tried counted as tried there too, and reports whether
// it did. A health change may have brought backends that the first route
// did not hold: the backups, once the only primary failed while the
// client's connect to it was in flight (on_down = "close", or a connect
// that timed out). Without this that client would be closed for want of
// a next backend while the backup takes everyone after it. Bounded, with
// the restarts after a retirement, by maxDialAttempts.
func (c *proxyConn) moveToCurrentRoute() bool {
	r := c.svc.route.Load()
	if r == c.route || r.balancer == nil || c.restarts >= maxDialAttempts {
		return false
	}
	tried := make([]int, 0, len(c.tried))
	for _, i := range c.tried {
		if j := slices.Index(r.backends, c.route.backends[i]); j >= 0 {
			tried = append(tried, j)
		}
	}
	c.restarts++
	c.route, c.tried = r, tried
	c.key = clientKey(c.peer.src, r.cfg.HashKey)
	return true
}

// dialFailed accounts for a failed connect to be, whose descriptor and
// active count are already given back. It returns false, having ended the
// connection, when the failure is this host's (out of descriptors or
// memory): the next backend would fail alike.
func (c *proxyConn) dialFailed(be *Backend, err error) bool {
	s, r := c.svc, c.route
	if isLocalShortage(err) {
		s.refuse(c.peer.src, "cannot open a socket to a backend: "+err.Error())
		c.finish(nil)
		return false
	}
	if blamesBackend(err) {
		s.connectFailed(r.cfg, be, err)
	}
	failures := be.dialFailed.Add(1)
	if s.allowLog(&be.lastDialLog) {
		s.log.Warn("connect to backend failed, trying the next one", "service", r.cfg.Name, "backend", be.addr, "error", err, "failures_total", failures)
	}
	return true
}

// dropBackend closes the backend socket of a connect that did not become a
// proxied connection, with its timer and flags, and gives back its count.
func (c *proxyConn) dropBackend() *Backend {
	be := c.target
	c.loop.unschedule(c)
	rawClose(c.backend)
	c.backend, c.target, c.be = -1, nil, sockFlags{}
	be.active.Add(-1)
	return be
}

// connectFailed drops the backend whose connect failed with err and tries
// the next one.
func (c *proxyConn) connectFailed(err error) {
	be := c.dropBackend()
	err = &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(be.addr), Err: err}
	if c.dialFailed(be, err) {
		c.dialNext()
	}
}

// connectDone runs when the backend socket of a connect in flight turns
// writable: connected, or failed, which it reads from the event. A connecting socket turns writable only once it is connected
// or has failed, and a failure always comes with EPOLLERR or EPOLLHUP
// (tcp_poll), so only then does SO_ERROR need reading: one system call
// fewer per connection.
func (c *proxyConn) connectDone(events uint32) {
	if events&(unix.EPOLLERR|unix.EPOLLHUP) == 0 {
		c.connected()
		return
	}
	errno, err := rawGetsockoptInt(c.backend, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && errno != 0 {
		err = syscall.Errno(errno)
	}
	if err != nil {
		c.connectFailed(os.NewSyscallError("connect", err))
		return
	}
	c.connected()
}

func (c *proxyConn) connected() {
	be, r := c.target, c.route
	be.connectTime.observe(time.Duration(monotonicNow() - c.dialStart))
	connectOK(be)
	if err := c.sendProxyHeader(); err != nil {
		c.connectFailed(err)
		return
	}
	if closedWhileConnecting(r, be) {
		// The client has sent nothing through yet: the key's next
		// backend takes it.
		c.dropBackend()
		c.dialNext()
		return
	}
	if cur := c.svc.route.Load(); cur.cfg.OnFailback == config.OnFailbackClose && failedBack(r, cur) {
		// The route moved from the backups back to the primaries while
		// this connect to a backup was in flight: the failback closed
		// the backups' connections before this one was among them.
		c.startOver("every backend chosen was a backup left by a failback while connecting")
		return
	}
	if !be.track(c) {
		// A reload retired the backend while its connect was in flight.
		c.startOver("every backend chosen was removed while connecting")
		return
	}
	c.state = stateOpen
	c.idleTimeout, c.halfCloseTimeout = r.cfg.IdleTimeout, r.cfg.HalfCloseTimeout
	c.opened = c.loop.now
	c.lastActive = c.loop.now
	c.up.moved, c.down.moved = &be.bytesToBack, &be.bytesToCli
	c.loop.schedule(c, c.loop.now+int64(c.idleTimeout))
	c.pump()
}

// startOver drops the backend a connect has just reached and starts the
// connection over on the current route rather than cutting it: the client
// has sent nothing through yet. reason is for the refusal once it has
// started over maxDialAttempts times.
func (c *proxyConn) startOver(reason string) {
	c.dropBackend()
	c.restarts++
	if c.restarts > maxDialAttempts {
		c.svc.refuse(c.peer.src, reason)
		c.finish(nil)
		return
	}
	c.startRoute()
}

// closedWhileConnecting reports whether be went down under on_down =
// "close" while a connect to it was in flight: the close swept the
// backend's open connections once, before this one was among them. A
// panicking route offers down backends on purpose, and keeps them; a
// mark-down by passive detection alone keeps open connections, and so
// this one.
func closedWhileConnecting(r *route, be *Backend) bool {
	return r.cfg.OnDown == config.OnDownClose && !r.panicking && be.health.tracker.State() == health.Down && !be.health.passiveDown.Load()
}

// sendProxyHeader writes the PROXY header to the fresh backend socket when
// the service sends one. Its send buffer is empty, so a header of at most
// 52 bytes goes out whole.
func (c *proxyConn) sendProxyHeader() error {
	v := c.route.cfg.ProxyProtocol
	if v == "" || v == config.ProxyNone {
		return nil
	}
	dst := c.peer.dst
	if !dst.IsValid() {
		dst = localAddrOf(c.client)
	}
	buf := c.loop.header[:0]
	hdr := appendProxyHeader(buf, v, c.peer.src, dst, false)
	n, err := unix.Write(c.backend, hdr)
	if err == nil && n < len(hdr) {
		err = unix.EAGAIN
	}
	if err != nil {
		return fmt.Errorf("send PROXY header: %w", err)
	}
	return nil
}

// localAddrOf is the address a client connected to, IPv4-mapped addresses
// unmapped.
func localAddrOf(fd int) netip.AddrPort {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}
	}
	addr, _, _ := sockaddrAddrPort(sa)
	return netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
}

// sockaddrAddrPort is an IP socket address as an AddrPort, without the
// IPv6 zone, which is zoneID (0 for none); false for other families.
func sockaddrAddrPort(sa unix.Sockaddr) (addr netip.AddrPort, zoneID uint32, ok bool) {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), 0, true
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)), sa.ZoneId, true
	}
	return netip.AddrPort{}, 0, false
}

// startConnect opens a non-blocking socket and starts its connect to addr.
func startConnect(addr netip.AddrPort) (int, error) {
	family := unix.AF_INET
	if !addr.Addr().Is4() {
		family = unix.AF_INET6
	}
	fd, err := rawSocket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	// Requests and replies leave at once, as from the client side (whose
	// sockets inherit it from the listener).
	if err := rawSetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		rawClose(fd)
		return -1, os.NewSyscallError("setsockopt", err)
	}
	if err := rawConnect(fd, addr); err != nil && err != unix.EINPROGRESS {
		rawClose(fd)
		return -1, os.NewSyscallError("connect", err)
	}
	return fd, nil
}

// onEvent handles an epoll event of one of the connection's sockets.
func (c *proxyConn) onEvent(events uint32, tag int32) {
	if tag&1 == 1 {
		if tag != c.backendTag|1 || c.backend < 0 {
			return // a backend socket already closed
		}
		c.be.update(events)
	} else {
		c.cl.update(events)
	}
	switch c.state {
	case stateHeader:
		if c.cl.readable {
			c.readHeader()
		}
	case stateConnecting:
		if tag&1 == 1 && c.be.writable {
			c.connectDone(events)
		}
	case stateOpen:
		if events&unix.EPOLLERR != 0 {
			if err := c.errorNoReadWillSee(tag); err != nil {
				c.finish(err)
				return
			}
		}
		c.pump()
	}
}

// errorNoReadWillSee is the pending error (a reset) of the socket an
// event with EPOLLERR came from, once the direction that reads that
// socket has passed on its EOF: nothing reads it again, so without this a
// client that half-closed and then reset would keep its backend working
// until a timeout. Before the EOF the next read reports the error, after
// the bytes that came before it.
func (c *proxyConn) errorNoReadWillSee(tag int32) error {
	fd, reader := c.client, &c.up
	if tag&1 == 1 {
		fd, reader = c.backend, &c.down
	}
	if !reader.eof {
		return nil
	}
	errno, err := rawGetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && errno != 0 {
		err = syscall.Errno(errno)
	}
	if err != nil {
		return &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", err)}
	}
	return nil
}

// onTimer runs when the connection's deadline is due.
func (c *proxyConn) onTimer() {
	switch c.state {
	case stateHeader:
		c.rejectClient(RejectProxyHeaderTimeout, errProxyTimeout)
	case stateConnecting:
		// A loop that fell behind (more ready events than one epoll_wait
		// returns, or a thread starved of CPU) can reach this timer
		// before the event that says the connect is done: a connect that
		// is done is no timeout. poll's POLLERR and POLLHUP are epoll's.
		if done := rawPollNow(c.backend, unix.POLLOUT); done != 0 {
			c.connectDone(uint32(done))
			return
		}
		c.connectFailed(errConnectTimeout)
	case stateOpen:
		timeout := c.idleTimeout
		if c.halfClosed {
			timeout = min(timeout, c.halfCloseTimeout)
		}
		if deadline := c.lastActive + int64(timeout); deadline > c.loop.now {
			c.loop.schedule(c, deadline)
			return
		}
		if c.kernelStillSending() {
			c.lastActive = c.loop.now
			c.loop.schedule(c, c.loop.now+int64(timeout))
			return
		}
		c.finish(errIdle)
	}
}

// readHeader reads the PROXY header of a client of a trusted balancer,
// then admits the address it carries and dials, or rejects the client.
func (c *proxyConn) readHeader() {
	h, done, err := peekProxyHeader(c.client, &c.loop.header)
	if !done {
		c.cl.readable = false
		return
	}
	if err != nil {
		c.rejectClient(RejectBadProxyHeader, err)
		return
	}
	c.loop.unschedule(c)
	if !h.local {
		c.peer.src, c.peer.dst = h.src, h.dst
	}
	c.svc.stopWaiting(c)
	c.peer.headerDue = false
	l, reason, ok := c.svc.admit(c.svc.route.Load(), c.peer.src.Addr())
	if !ok {
		c.rejectClient(reason, nil)
		return
	}
	c.peer.lease = l
	c.startRoute()
}

// rejectClient closes a client that a limit, access list or PROXY check
// turned away, with a reset: see Service.reject.
func (c *proxyConn) rejectClient(reason RejectReason, err error) {
	c.svc.countReject(c.peer.src, reason, err)
	rawResetOnClose(c.client)
	c.finish(nil)
}

// kernelStillSending reports whether either socket's send queue has
// changed since the idle timer last looked (the first look counts as a
// change, so a peer that never reads gets one extra period). l4lb can hand a peer megabytes
// at once (the kernel's socket buffers grow to the bandwidth-delay
// product, plus a pipe's worth), after which a slow but steady reader
// drains them without l4lb moving a byte: that connection is busy, not
// idle. A queue that stays the same size, or empty, is a peer that stopped
// reading, or nothing to send, is idle.
func (c *proxyConn) kernelStillSending() bool {
	moved := false
	for _, q := range [...]struct {
		fd   int
		last *int64
	}{{c.client, &c.queuedToClient}, {c.backend, &c.queuedToBackend}} {
		n := sendQueued(q.fd)
		if prev := *q.last; n > 0 && n != prev {
			moved = true
		}
		*q.last = n
	}
	return moved
}

// sendQueued is how many bytes a socket's send queue holds (SIOCOUTQ):
// sent but not yet acknowledged, or not yet sent; 0 when it cannot tell.
func sendQueued(fd int) int64 {
	n, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		return 0
	}
	return int64(n)
}

// startHalfClose switches the connection to half_close_timeout once one
// direction has passed on its EOF: from then on the other direction is
// cut after that long without a byte (HAProxy's client-fin/server-fin).
func (c *proxyConn) startHalfClose() {
	if c.halfCloseTimeout <= 0 || c.halfCloseTimeout >= c.idleTimeout || c.halfClosed {
		return
	}
	c.halfClosed = true
	// The EOF is news: the timeout counts from it, not from the last byte
	// before it, which may be longer ago than half_close_timeout.
	c.lastActive = c.loop.now
	c.loop.schedule(c, c.lastActive+int64(c.halfCloseTimeout))
}

// finish closes the connection and gives back everything it holds. err is
// why it ended: nil when its peers closed it or it never opened,
// errAborted when l4lb cut it, errIdle, or the failure of a read or write.
func (c *proxyConn) finish(err error) {
	if c.state == stateClosed {
		return
	}
	s, l := c.svc, c.loop
	opened := c.state == stateOpen
	c.state = stateClosed
	if c.peer.headerDue {
		s.stopWaiting(c)
		c.peer.headerDue = false
	}
	l.unschedule(c)
	reset := opened && c.endsWithReset(err)
	c.up.release(l.pipes)
	c.down.release(l.pipes)
	switch {
	case !opened:
		rawClose(c.client)
		if c.backend >= 0 {
			c.dropBackend()
		}
	case reset:
		// After a timeout the peer still to take bytes is gone or stuck,
		// and after l4lb's own cut nothing is worth waiting for.
		afterSent := !errors.Is(err, errIdle) && !errors.Is(err, errAborted)
		l.closeWithReset(c.client, afterSent, c.idleTimeout)
		l.closeWithReset(c.backend, afterSent, c.idleTimeout)
	default:
		rawClose(c.client)
		rawClose(c.backend)
	}
	if opened {
		c.target.untrack(c)
	}
	l.releaseSlot(c.slot)
	s.releaseLease(c.peer.lease)
	s.releaseSlot()
	if opened {
		c.logClose(err)
	}
	s.handlers.Done()
}

// endsWithReset reports whether the open connection, ending with err,
// closes both sockets with a reset instead of a FIN:
//   - when the stream was cut: a read or write failed (a peer reset, a
//     broken ring), now or before (writeFailed), or l4lb drops bytes it
//     holds (a timeout or a drain with a peer not reading). A FIN would
//     tell the other peer the stream ended whole, so that a client takes
//     a truncated reply, or a backend a truncated upload, for all of it.
//     Envoy's tcp_proxy passes an upstream reset on the same way.
//   - at the half-close timeout: the peer still sending is gone or stuck,
//     and a FIN would leave our socket in FIN_WAIT2 for tcp_fin_timeout
//     waiting on that same peer.
//
// Peers that closed (nil), and an idle timeout or l4lb's own cut
// (errAborted) of a connection holding no bytes, get a FIN. It must run
// before the directions release what they hold.
func (c *proxyConn) endsWithReset(err error) bool {
	switch {
	case c.writeErr != nil, c.up.pending(), c.down.pending():
		return true
	case err == nil, errors.Is(err, errAborted):
		return false
	case errors.Is(err, errIdle):
		return c.halfClosed
	}
	return true
}

func (c *proxyConn) logClose(err error) {
	s := c.svc
	if errors.Is(err, errAborted) {
		err = nil // l4lb cut it on purpose: forced says so
	}
	if err != nil && !errors.Is(err, errIdle) {
		s.proxyErrors.Add(1)
	}
	if s.logConnections != nil && s.logConnections.Load() {
		s.log.Info("connection closed", "service", c.route.cfg.Name, "client", c.peer.src.String(), "backend", c.target.addr,
			"bytes_to_backend", c.up.bytes, "bytes_to_client", c.down.bytes,
			"duration", time.Duration(monotonicNow()-c.opened).Round(time.Millisecond).String(), "reason", closeReason(c, err))
	} else if err != nil && s.log.IsDebug() {
		s.log.Debug("connection ended", "service", c.route.cfg.Name, "client", c.peer.src.String(), "backend", c.target.addr, "reason", err)
	}
}

// closeReason names why a proxied connection ended, for the connection log.
func closeReason(c *proxyConn, err error) string {
	switch {
	case c.forced.Load():
		return "closed by l4lb (drain, shutdown, backend down or failback)"
	case errors.Is(err, errIdle) && c.halfClosed:
		return "half-close timeout"
	case errors.Is(err, errIdle):
		return "idle timeout"
	case err != nil:
		return err.Error()
	default:
		return "closed by peers"
	}
}
