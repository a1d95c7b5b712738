package l4

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// proxyConn is one client connection joined to one backend connection.
type proxyConn struct {
	client  *net.TCPConn
	backend *net.TCPConn
	target  *Backend

	idleTimeout time.Duration
	// halfCloseTimeout replaces idleTimeout, when shorter, once one
	// direction has finished (halfClosed): see startHalfClose.
	halfCloseTimeout time.Duration
	halfClosed       atomic.Bool
	// lastActive is when a byte last moved either way, in monotonicNow
	// units. Both copy directions write it; either may read it.
	lastActive atomic.Int64

	abortOnce sync.Once
	// aborted is set by abort, before it wakes the copy directions.
	aborted atomic.Bool
	// eofs counts the directions that ended with EOF.
	eofs atomic.Int32
	// forced is set when l4lb itself cut the connection (a drain deadline,
	// shutdown, a backend marked down), for the connection log.
	forced atomic.Bool
	// Bytes each way, set when the connection ends, for the connection log.
	sentToBackend, sentToClient int64
	// queuedToClient and queuedToBackend are the bytes the kernel still
	// held in each socket's send queue when the idle timer last fired:
	// see kernelStillSending.
	queuedToClient, queuedToBackend atomic.Int64

	prev, next *proxyConn // links in target.conns, guarded by target.mu
}

func (c *proxyConn) touch() { c.lastActive.Store(monotonicNow()) }

// idleDeadline returns when the connection becomes idle if nothing moves,
// and whether that moment has already passed.
func (c *proxyConn) idleDeadline() (time.Time, bool) {
	last := time.Duration(c.lastActive.Load())
	timeout := c.idleTimeout
	if c.halfClosed.Load() {
		timeout = min(timeout, c.halfCloseTimeout)
	}
	deadline := clockStart.Add(last + timeout)
	return deadline, !time.Now().Before(deadline)
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
	for _, q := range []struct {
		conn *net.TCPConn
		last *atomic.Int64
	}{{c.client, &c.queuedToClient}, {c.backend, &c.queuedToBackend}} {
		n := sendQueued(q.conn)
		if prev := q.last.Swap(n); n > 0 && n != prev {
			moved = true
		}
	}
	return moved
}

// sendQueued is how many bytes conn's send queue holds (SIOCOUTQ): sent
// but not yet acknowledged, or not yet sent; 0 when it cannot tell.
func sendQueued(conn *net.TCPConn) int64 {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0
	}
	var n int
	rc.Control(func(fd uintptr) {
		n, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
	})
	if err != nil {
		return 0
	}
	return int64(n)
}

// abort ends both copy directions at once, from any goroutine: it marks
// the connection aborted and moves both sockets' deadlines to the past,
// which wakes a direction parked on either socket with errAborted. It does
// not close the sockets: run does, once both directions have returned, so
// that a copier may write to its destination's descriptor from its
// source's callback (copy.go) without the number being closed and reused
// under it. Nothing else may close c.client or c.backend while run runs.
func (c *proxyConn) abort() {
	c.abortOnce.Do(func() {
		c.aborted.Store(true)
		past := time.Unix(1, 0)
		c.client.SetDeadline(past)
		c.backend.SetDeadline(past)
	})
}

// close closes both sockets; see abort for when.
func (c *proxyConn) close() {
	c.client.Close()
	c.backend.Close()
}

// run moves bytes both ways until both directions are done, then closes
// both sockets. A direction that reads EOF half-closes its destination
// (CloseWrite), so a client that shuts its write side still receives the
// whole reply; any error or the idle timeout aborts both directions.
func (c *proxyConn) run(pipes *pipePool) error {
	defer c.close()
	c.touch()
	deadline := clockStart.Add(time.Duration(c.lastActive.Load()) + c.idleTimeout)
	c.client.SetDeadline(deadline)
	c.backend.SetDeadline(deadline)
	if c.aborted.Load() {
		// Aborted before it started (its backend was retired while it
		// dialed), and the deadlines above may have undone abort's.
		return nil
	}

	toBackend, err := newCopier(c, pipes, c.backend, c.client, &c.target.bytesToBack)
	if err != nil {
		return err
	}
	toClient, err := newCopier(c, pipes, c.client, c.backend, &c.target.bytesToCli)
	if err != nil {
		return err
	}
	upErr := make(chan error, 1)
	go c.copyClientToBackend(toBackend, upErr)
	downErr := c.copyBackendToClient(toClient)
	err = <-upErr
	c.sentToBackend, c.sentToClient = toBackend.bytes, toClient.bytes
	if err == nil {
		err = downErr
	}
	return err
}

// startHalfClose switches the connection to half_close_timeout once one
// direction has passed on its EOF: from then on the other direction is
// cut after that long without a byte (HAProxy's client-fin/server-fin).
// The deadlines move in at once; a copier that is just re-arming its own
// deadline from the old timeout may push it back out, and then the
// shorter timeout applies from that deadline on.
func (c *proxyConn) startHalfClose() {
	if c.halfCloseTimeout <= 0 || c.halfCloseTimeout >= c.idleTimeout || c.halfClosed.Swap(true) {
		return
	}
	deadline, _ := c.idleDeadline()
	c.client.SetDeadline(deadline)
	c.backend.SetDeadline(deadline)
	if c.aborted.Load() {
		// abort's deadlines in the past may have been overwritten above.
		past := time.Unix(1, 0)
		c.client.SetDeadline(past)
		c.backend.SetDeadline(past)
	}
}

// The two directions have their own named functions so that goroutine
// dumps say which way a stuck copy was going.

func (c *proxyConn) copyClientToBackend(s *copier, done chan<- error) {
	done <- c.finishDirection(s.copy(), c.backend)
}

func (c *proxyConn) copyBackendToClient(s *copier) error {
	return c.finishDirection(s.copy(), c.client)
}

func (c *proxyConn) finishDirection(err error, dst *net.TCPConn) error {
	if err == nil {
		// EOF: pass the half-close on. An error here means dst is already
		// gone, which the other direction will see for itself. The second
		// direction to end skips it: run closes both sockets at once,
		// which sends the same FIN (dst has nothing left unread: the other
		// direction read it to EOF), one system call fewer per connection.
		if c.eofs.Add(1) == 1 {
			dst.CloseWrite()
		}
		c.startHalfClose()
		return nil
	}
	if errors.Is(err, errIdle) && c.halfClosed.Load() {
		// The half-close timeout: the peer still sending is gone or stuck.
		// A reset frees both sockets at once; a FIN would leave ours in
		// FIN_WAIT2 for tcp_fin_timeout waiting on that same peer.
		c.client.SetLinger(0)
		c.backend.SetLinger(0)
	}
	c.abort()
	if errors.Is(err, errAborted) || errors.Is(err, net.ErrClosed) {
		// The other direction or a drain ended the connection on purpose.
		return nil
	}
	return err
}
