package l4

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// copyBufSize is the buffer of the read/write path. A request or reply of
// a database or game protocol fits in one read; a read that fills the
// buffer means a bulk transfer, which moves to splice (see copier). 16 KiB
// is HAProxy's default bufsize, and what the redis and iperf3 rows of
// docs/performance.md were measured with.
const copyBufSize = 16 << 10

// copyBuf is one pooled buffer; pooled as a pointer so that Put does not
// allocate.
type copyBuf [copyBufSize]byte

// errAborted ends a copy whose connection was aborted (proxyConn.abort):
// by the other direction's failure, a drain, a shutdown or its backend
// going down.
var errAborted = errors.New("connection aborted")

// copier moves the bytes of one direction of a proxied connection, on Go's
// netpoller, in one of two modes chosen per chunk, like HAProxy's
// splice-auto:
//
//   - read/write (the default): read(2) into a pooled 16 KiB buffer and
//     write(2) it to the destination from the same netpoller callback, then
//     read again until EAGAIN. A message costs a read, a write and the
//     read that finds the socket empty; no pipe, no second wake-up for the
//     write.
//   - splice: once a read fills the buffer, the transfer is bulk and the
//     copier splices (socket to pipe to socket, no copy through user
//     space), through a pipe borrowed from pipePool, until a splice moves
//     less than a buffer's worth, then it goes back to read/write.
//
// Neither mode holds a buffer or a pipe while the connection is idle: an
// idle proxied connection costs its two sockets and two parked goroutines.
// Every chunk is counted in moved and refreshes the idle timer.
//
// The callbacks are built once per copier, so moving a chunk allocates
// nothing.
type copier struct {
	conn   *proxyConn
	pools  *pipePool
	src    syscall.RawConn
	dst    syscall.RawConn
	srcTCP *net.TCPConn
	dstTCP *net.TCPConn
	// dstFD is written to from inside src's read callback, which saves a
	// netpoller round trip per message. The descriptor cannot be closed
	// and reused meanwhile: proxyConn closes its sockets only after both
	// directions have returned (see proxyConn.abort).
	dstFD int

	// buf[off:end] was read and is not yet written; buf is nil between
	// chunks.
	buf      *copyBuf
	off, end int
	// pipe is held in splice mode while bytes are in flight.
	pipe     *pipe
	splicing bool

	// Results of the last callback.
	eof bool
	err error

	readWrite, fillPipe, flushBuf, drainPipe func(fd uintptr) bool

	bytes int64
	// moved is the backend's byte counter for this direction, updated per
	// chunk so that metrics see long-lived connections as they go.
	moved *atomic.Uint64
}

func newCopier(c *proxyConn, pools *pipePool, dst, src *net.TCPConn, moved *atomic.Uint64) (*copier, error) {
	srcRaw, err := src.SyscallConn()
	if err != nil {
		return nil, err
	}
	dstRaw, err := dst.SyscallConn()
	if err != nil {
		return nil, err
	}
	cp := &copier{conn: c, pools: pools, src: srcRaw, dst: dstRaw, srcTCP: src, dstTCP: dst, moved: moved, dstFD: -1}
	if err := dstRaw.Control(func(fd uintptr) { cp.dstFD = int(fd) }); err != nil {
		return nil, err
	}
	cp.readWrite = cp.readWriteFD
	cp.fillPipe = cp.fillPipeFD
	cp.flushBuf = cp.flushBufFD
	cp.drainPipe = cp.drainPipeFD
	return cp, nil
}

// copy runs until src reports EOF (nil error) or a failure. It never
// closes a socket; the caller decides what EOF and errors mean for the
// connection.
func (cp *copier) copy() error {
	defer cp.release()
	for {
		read := cp.readWrite
		if cp.splicing {
			read = cp.fillPipe
		}
		if err := cp.src.Read(read); err != nil {
			if err := cp.waitIdle(cp.srcTCP, err, true); err != nil {
				return err
			}
			continue // the deadline moved: wait again
		}
		if cp.err != nil {
			return cp.err
		}
		if cp.eof {
			return nil
		}
		// Write out what the destination did not take at once before
		// reading again: bytes left behind would wait for the source's
		// next bytes.
		for cp.pending() {
			write := cp.flushBuf
			if cp.buf == nil {
				write = cp.drainPipe
			}
			if err := cp.dst.Write(write); err != nil {
				if err := cp.waitIdle(cp.dstTCP, err, false); err != nil {
					return err
				}
				continue
			}
			if cp.err != nil {
				return cp.err
			}
		}
		if !cp.splicing && cp.pipe != nil {
			// Back to read/write after a burst, with the pipe drained:
			// give it back now, or the connection would keep two more
			// descriptors for the rest of its life.
			cp.pools.put(cp.pipe)
			cp.pipe = nil
		}
	}
}

func (cp *copier) pending() bool {
	return cp.buf != nil || (cp.pipe != nil && cp.pipe.buffered > 0)
}

// release gives back what the copier holds when it ends.
func (cp *copier) release() {
	cp.putBuf()
	if cp.pipe != nil {
		cp.pools.put(cp.pipe)
		cp.pipe = nil
	}
}

func (cp *copier) putBuf() {
	if cp.buf != nil {
		cp.pools.bufs.Put(cp.buf)
		cp.buf = nil
	}
}

// count accounts for n bytes read from the source.
func (cp *copier) count(n int) {
	cp.bytes += int64(n)
	cp.moved.Add(uint64(n))
	cp.conn.touch()
}

// readWriteFD is the RawConn.Read callback of read/write mode. It returns
// false to park until the source is readable, true when copy must act:
// EOF, an error, a write to wait for, or a switch to splice.
func (cp *copier) readWriteFD(fd uintptr) bool {
	cp.err = nil
	for {
		if cp.buf == nil {
			cp.buf = cp.pools.bufs.Get().(*copyBuf)
		}
		n, err := rawRead(int(fd), cp.buf[:])
		if err != nil {
			cp.putBuf()
			switch err {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			}
			cp.err = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", err)}
			return true
		}
		if n == 0 {
			cp.putBuf()
			cp.eof = true
			return true
		}
		cp.count(n)
		full := n == len(cp.buf)
		cp.off, cp.end = 0, n
		if !cp.writeBuf(cp.dstFD) {
			// The destination is full (or failed): copy waits for it. A
			// full read still means bulk.
			cp.splicing = full
			return true
		}
		if full {
			cp.putBuf()
			cp.splicing = true
			return true
		}
		// Read again until EAGAIN before parking, even after a short read:
		// a FIN (or a reset) that came with the bytes just read has
		// already spent its netpoller wake-up, and read(2) reports it
		// only on the next call. Parking now would miss the EOF.
	}
}

// flushBufFD is the RawConn.Write callback that writes out the rest of the
// buffer.
func (cp *copier) flushBufFD(fd uintptr) bool {
	cp.err = nil
	off := cp.off
	done := cp.writeBuf(int(fd))
	if cp.off > off {
		// Bytes reached a slow reader: the connection is not idle.
		cp.conn.touch()
	}
	if !done {
		return cp.err != nil
	}
	cp.putBuf()
	return true
}

// writeBuf writes buf[off:end] to fd. It returns true when all of it went
// out, false when fd is full or failed (then err is set).
func (cp *copier) writeBuf(fd int) bool {
	for cp.off < cp.end {
		n, err := rawWrite(fd, cp.buf[cp.off:cp.end])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false
		case err != nil:
			cp.err = &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", err)}
			return false
		}
		cp.off += n
	}
	return true
}

// waitIdle turns a deadline expiry into either errIdle, when the whole
// connection has been idle for its timeout, errAborted when the connection
// was aborted, or a new deadline and a nil error, so that the caller
// retries. Other errors pass through. Deadlines are pushed lazily, when
// they fire, rather than on every chunk: one timer reset per idle period
// instead of one per read.
func (cp *copier) waitIdle(conn *net.TCPConn, err error, reading bool) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if cp.conn.aborted.Load() {
		return errAborted
	}
	next, idle := cp.conn.idleDeadline()
	if idle {
		if !cp.conn.kernelStillSending() {
			return errIdle
		}
		cp.conn.touch()
		next, _ = cp.conn.idleDeadline()
	}
	if reading {
		conn.SetReadDeadline(next)
	} else {
		conn.SetWriteDeadline(next)
	}
	// abort stores the flag before it moves the deadlines to the past:
	// either this load sees it, or abort's deadline comes after ours.
	if cp.conn.aborted.Load() {
		return errAborted
	}
	return nil
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
