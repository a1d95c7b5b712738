package l4

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// copyBufSize is the buffer of the read/write path. A request or reply of
// a database or game protocol fits in one read; a read that fills the
// buffer means a bulk transfer, which moves to splice (see direction). 16 KiB
// is HAProxy's default bufsize, and what the redis and iperf3 rows of
// docs/performance.md were measured with.
const copyBufSize = 16 << 10

// copyBuf is one pooled buffer; pooled as a pointer so that Put does not
// allocate.
type copyBuf [copyBufSize]byte

// errAborted ends a connection that l4lb cut: a drain, a shutdown or its
// backend going down.
var errAborted = errors.New("connection aborted")

// direction is one way of a proxied connection. Bytes move in one of two
// modes chosen per chunk, like HAProxy's splice-auto:
//
//   - read/write (the default): a read and a write per message, made in
//     the loop's round with the other connections' (round.go: one
//     io_uring_enter for the round's reads, one for its writes), or one
//     system call each without io_uring. Only what the destination does
//     not take is copied to a pooled buffer of the direction's own, held
//     until it drains.
//   - splice: once a read fills the buffer, the transfer is bulk and the
//     direction splices (socket to pipe to socket, no copy through user
//     space) through a pipe borrowed from the pipe pool, until a splice
//     moves less than a buffer's worth; then it drains the pipe, gives it
//     back and returns to read/write.
//
// Neither mode holds a buffer or a pipe while the connection is idle: an
// idle proxied connection costs its two sockets and this struct.
type direction struct {
	// buf[off:end] was read and not yet written; buf is nil otherwise.
	buf      *copyBuf
	off, end int
	// pipe is held in splice mode while bytes are in flight.
	pipe     *pipe
	splicing bool
	// busy: a read or write of the direction is queued in the loop's
	// round (round.go), and the direction waits for its result.
	busy bool
	// eof: the source sent its FIN; shut: the destination was told.
	eof, shut bool

	bytes int64
	// moved is the backend's byte counter for this direction, updated per
	// chunk so that metrics see long-lived connections as they go.
	moved *atomic.Uint64
}

func (d *direction) pending() bool {
	return d.buf != nil || (d.pipe != nil && d.pipe.buffered > 0)
}

// release gives back what the direction holds when the connection ends.
func (d *direction) release(pipes *pipePool) {
	if d.buf != nil {
		pipes.bufs.Put(d.buf)
		d.buf = nil
	}
	if d.pipe != nil {
		pipes.put(d.pipe)
		d.pipe = nil
	}
}

// pump moves what the sockets' readiness allows, both ways, and closes the
// connection when both directions are done or one fails.
func (c *proxyConn) pump() {
	for {
		failed := c.writeErr
		err := c.move(&c.up, &c.down, c.client, c.backend, &c.cl, &c.be)
		if err == nil {
			err = c.move(&c.down, &c.up, c.backend, c.client, &c.be, &c.cl)
		}
		if err != nil {
			c.finish(err)
			return
		}
		if c.writeErr == failed {
			break
		}
		// A write failed in this pass: the other direction has a socket
		// to read to its end now (writeFailed), and if it had its turn
		// before, the events that said so may be spent.
	}
	if c.up.shut && c.down.shut {
		c.finish(c.writeErr)
	}
}

// move runs direction d from src to dst until it has to wait for one of
// them (a flag in sf or df turns false), reaches EOF, or fails.
func (c *proxyConn) move(d, other *direction, src, dst int, sf, df *sockFlags) error {
	err := c.moveUntilWait(d, other, src, dst, sf, df)
	if err == nil {
		// Before errors.As: its target escapes, and would cost an
		// allocation on every call.
		return nil
	}
	var failed *writeError
	if errors.As(err, &failed) {
		return c.writeFailed(d, df, failed.err)
	}
	return err
}

// writeError is a failed write of a direction to its destination, as
// opposed to a failed read of its source: see writeFailed.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// writeFailed goes on from a write of direction d that failed with err.
// When the destination's peer is gone (it reset, or its socket is closed
// since), what it sent before may still wait in its socket, ahead of the
// reset, for the other direction to read: a server that answers a
// request too large and closes with the upload unread. So d drops what it
// holds and reads no more, the other direction passes on the rest of that
// socket (reading a dead socket never waits: its bytes, then EOF or the
// error), and pump then ends the connection with err, with a reset
// (endsWithReset). Any other error ends the connection now.
func (c *proxyConn) writeFailed(d *direction, df *sockFlags, err error) error {
	if !errors.Is(err, unix.ECONNRESET) && !errors.Is(err, unix.EPIPE) {
		return err
	}
	if c.writeErr == nil {
		c.writeErr = err
	}
	d.release(c.loop.pipes)
	d.eof, d.shut = true, true
	df.readable, df.readUntilEAGAIN = true, true
	return nil
}

func (c *proxyConn) moveUntilWait(d, other *direction, src, dst int, sf, df *sockFlags) error {
	for {
		if d.busy {
			return nil // flushRound goes on from here
		}
		if d.pending() {
			if !df.writable {
				return nil
			}
			if err := c.flush(d, dst, df); err != nil {
				return err
			}
			if d.pending() {
				return nil
			}
			if !d.splicing && d.pipe != nil {
				// Back to read/write after a burst, with the pipe drained:
				// give it back now, or the connection would keep two more
				// descriptors for the rest of its life.
				c.loop.pipes.put(d.pipe)
				d.pipe = nil
			}
		}
		if d.eof {
			if d.pipe != nil {
				// Drained: a half-closed connection may stay open for
				// long, and the direction that ended needs no pipe.
				c.loop.pipes.put(d.pipe)
				d.pipe = nil
			}
			if !d.shut {
				d.shut = true
				// Pass the half-close on. When the other way is done too,
				// finish closes both sockets at once, which sends the same
				// FIN: one system call fewer per connection.
				if !other.shut {
					rawShutdownWrite(dst)
					c.startHalfClose()
				}
			}
			return nil
		}
		if !sf.readable {
			return nil
		}
		var err error
		if d.splicing {
			err = c.fillPipe(d, src, sf)
		} else {
			err = c.readWrite(d, src, dst, sf, df)
		}
		if err != nil {
			return err
		}
	}
}

// count accounts for n bytes read from the source.
func (c *proxyConn) count(d *direction, n int) {
	d.bytes += int64(n)
	d.moved.Add(uint64(n))
	c.lastActive = c.loop.now
}

// readWrite reads once and passes what it read on to dst: the read joins
// the loop's round (round.go) when it can, else it is made at once.
func (c *proxyConn) readWrite(d *direction, src, dst int, sf, df *sockFlags) error {
	if c.loop.queueRecv(c, d, src, dst, sf, df) {
		return nil
	}
	buf := c.loop.scratch[:]
	n, err := rawRead(src, buf)
	return c.afterRead(d, dst, sf, df, buf, n, err, false)
}

// afterRead goes on from a read of direction d into buf: n bytes, or err.
// inRound: buf is in the loop's arena, and its write joins the round;
// else it is made at once.
func (c *proxyConn) afterRead(d *direction, dst int, sf, df *sockFlags, buf []byte, n int, err error, inRound bool) error {
	switch {
	case err == unix.EINTR:
		return nil
	case err == unix.EAGAIN:
		sf.readable = false
		return nil
	case err != nil:
		return &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", err)}
	case n == 0:
		d.eof = true
		return nil
	}
	c.count(d, n)
	if n == len(buf) {
		d.splicing = true
	} else if !sf.readUntilEAGAIN {
		// A short read emptied the socket: the next bytes are a new
		// edge. Reading again would only find EAGAIN, unless a FIN or
		// urgent data came with these bytes, which the events say.
		sf.readable = false
	}
	if df.writable && inRound {
		c.loop.queueSend(c, d, df, dst, buf[:n])
		return nil
	}
	written := 0
	if df.writable {
		if written, err = writeAll(dst, buf[:n], df); err != nil {
			return err
		}
	}
	if written < n {
		d.hold(c.loop, buf[written:n])
	}
	return nil
}

// hold keeps p, which dst did not take, in a buffer of d's own until dst
// is writable again.
func (d *direction) hold(l *eventLoop, p []byte) {
	d.buf = l.pipes.bufs.Get().(*copyBuf)
	d.off, d.end = 0, copy(d.buf[:], p)
}

// flush writes out what d holds, from its buffer or its pipe.
func (c *proxyConn) flush(d *direction, dst int, df *sockFlags) error {
	if d.buf != nil {
		n, err := writeAll(dst, d.buf[d.off:d.end], df)
		if err != nil {
			return err
		}
		if n > 0 {
			// Bytes reached a slow reader: the connection is not idle.
			c.lastActive = c.loop.now
		}
		d.off += n
		if d.off == d.end {
			c.loop.pipes.bufs.Put(d.buf)
			d.buf = nil
		}
		return nil
	}
	return c.drainPipe(d, dst, df)
}

// writeAll writes p to fd until done or fd is full (df.writable turns
// false); it returns how much went out.
func writeAll(fd int, p []byte, df *sockFlags) (int, error) {
	done := 0
	for done < len(p) {
		n, err := rawWrite(fd, p[done:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			df.writable = false
			return done, nil
		case err != nil:
			return done, &writeError{&net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", err)}}
		}
		done += n
	}
	return done, nil
}

// rawRead and rawWrite are read(2) and write(2) without telling Go's
// scheduler that the thread is in a system call (RawSyscall), which saves
// entersyscall/exitsyscall and, more, stops sysmon from handing the P to
// another thread while a slow call runs: on a 2-core VM that hand-off, and
// sysmon polling every 20 µs to do it, cost more CPU than the calls. It is
// safe only because these sockets are non-blocking: the calls never wait.
func rawRead(fd int, p []byte) (int, error) {
	n, _, errno := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	n, _, errno := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
