package l4

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// pipeSize is what each borrowed pipe is asked to hold. Bigger pipes move
// more bytes per splice call on bulk transfers; the kernel only pins pages
// that are in flight, and a pipe is only held while bytes move (see
// spliceCopier), so an idle connection costs no pipe at all. 1 MiB is
// Go's own choice for io.Copy between sockets; the call fails harmlessly
// (leaving the 64 KiB default) above fs.pipe-max-size for non-root.
const pipeSize = 1 << 20

// pipe is a kernel pipe used as the zero-copy buffer between two sockets.
type pipe struct {
	r, w int
	// buffered is how many bytes sit in the pipe, moved in but not yet out.
	buffered int
}

// pipePool lends pipes to copiers while they move bytes. A pipe is only
// put back empty. It is a bounded free list rather than a sync.Pool: pooled
// pipes hold descriptors, which must be closed when dropped, not whenever a
// GC gets to them.
type pipePool struct {
	free chan *pipe
}

// maxIdlePipes bounds the pipes kept for reuse. Only connections moving
// bytes at this instant hold a pipe, so a few per core cover bursts; an
// idle empty pipe still costs two descriptors and some kernel memory.
const maxIdlePipes = 128

func newPipePool() *pipePool {
	return &pipePool{free: make(chan *pipe, maxIdlePipes)}
}

func (pp *pipePool) get() (*pipe, error) {
	select {
	case p := <-pp.free:
		return p, nil
	default:
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, &net.OpError{Op: "pipe2", Err: err}
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	return &pipe{r: fds[0], w: fds[1]}, nil
}

// put returns p for reuse, or closes it when it still holds bytes (they
// belong to a dead connection) or the pool is full.
func (pp *pipePool) put(p *pipe) {
	if p.buffered == 0 {
		select {
		case pp.free <- p:
			return
		default:
		}
	}
	unix.Close(p.r)
	unix.Close(p.w)
}

// errIdle ends a copy whose connection moved no byte in either direction
// for the idle timeout.
var errIdle = errors.New("idle timeout")

// spliceCopier moves bytes from one socket to another through a borrowed
// pipe with splice(2), on Go's netpoller: each splice is non-blocking, and
// when a socket is not ready the goroutine parks in RawConn.Read/Write
// until it is. Compared with io.Copy between TCP conns (which also
// splices), it holds no pipe while the connection is idle (io.Copy keeps
// one per direction for the connection's life: 4 descriptors and up to 2
// MiB of pipe buffers per idle connection), and it lets the idle timeout
// see every chunk.
//
// The read and write callbacks are built once per copier, so that moving a
// chunk allocates nothing.
type spliceCopier struct {
	conn   *proxyConn
	pipes  *pipePool
	src    syscall.RawConn
	dst    syscall.RawConn
	srcTCP *net.TCPConn
	dstTCP *net.TCPConn

	pipe *pipe
	// Results of the last callback.
	eof  bool
	err  error
	read func(fd uintptr) bool
	// write drains the pipe into the destination socket.
	write func(fd uintptr) bool
	bytes int64
	// moved is the backend's byte counter for this direction, updated per
	// chunk so that metrics see long-lived connections as they go.
	moved *atomic.Uint64
}

func newSpliceCopier(c *proxyConn, pipes *pipePool, dst, src *net.TCPConn, moved *atomic.Uint64) (*spliceCopier, error) {
	srcRaw, err := src.SyscallConn()
	if err != nil {
		return nil, err
	}
	dstRaw, err := dst.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &spliceCopier{conn: c, pipes: pipes, src: srcRaw, dst: dstRaw, srcTCP: src, dstTCP: dst, moved: moved}
	s.read = s.fillPipe
	s.write = s.drainPipe
	return s, nil
}

// copy runs until src reports EOF (nil error) or a failure. It never
// closes a socket; the caller decides what EOF and errors mean for the
// connection.
func (s *spliceCopier) copy() error {
	defer func() {
		if s.pipe != nil {
			s.pipes.put(s.pipe)
			s.pipe = nil
		}
	}()
	for {
		if err := s.src.Read(s.read); err != nil {
			if err := s.waitIdle(s.srcTCP, err, true); err != nil {
				return err
			}
			continue // the deadline moved: wait again
		}
		if s.err != nil {
			return s.err
		}
		if s.eof {
			return nil
		}
		// Drain the pipe completely before reading again: bytes left in it
		// would wait for the source's next bytes.
		for s.pipe.buffered > 0 {
			if err := s.dst.Write(s.write); err != nil {
				if err := s.waitIdle(s.dstTCP, err, false); err != nil {
					return err
				}
				continue
			}
			if s.err != nil {
				return s.err
			}
		}
		s.conn.touch()
	}
}

// fillPipe is the RawConn.Read callback: it returns false to park until
// the source is readable.
func (s *spliceCopier) fillPipe(fd uintptr) bool {
	s.err = nil
	if s.pipe == nil {
		p, err := s.pipes.get()
		if err != nil {
			s.err = err
			return true
		}
		s.pipe = p
	}
	for {
		n, err := unix.Splice(int(fd), nil, s.pipe.w, nil, pipeSize, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if s.pipe.buffered == 0 {
				// Nothing in flight: give the pipe back while we wait, so
				// idle connections hold none.
				s.pipes.put(s.pipe)
				s.pipe = nil
			}
			return false
		case err != nil:
			s.err = &net.OpError{Op: "splice", Net: "tcp", Err: err}
			return true
		case n == 0:
			s.eof = true
			return true
		}
		s.pipe.buffered += int(n)
		s.bytes += n
		s.moved.Add(uint64(n))
		return true
	}
}

// drainPipe is the RawConn.Write callback: it returns false to park until
// the destination has room.
func (s *spliceCopier) drainPipe(fd uintptr) bool {
	s.err = nil
	for s.pipe.buffered > 0 {
		n, err := unix.Splice(s.pipe.r, nil, int(fd), nil, s.pipe.buffered, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false
		case err != nil:
			s.err = &net.OpError{Op: "splice", Net: "tcp", Err: err}
			return true
		}
		s.pipe.buffered -= int(n)
	}
	return true
}

// waitIdle turns a deadline expiry into either errIdle, when the whole
// connection has been idle for its timeout, or a new deadline and a nil
// error, so that the caller retries. Other errors pass through. Deadlines are pushed lazily, when they
// fire, rather than on every chunk: one timer reset per idle period instead
// of one per read.
func (s *spliceCopier) waitIdle(conn *net.TCPConn, err error, reading bool) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	next, idle := s.conn.idleDeadline()
	if idle {
		return errIdle
	}
	if reading {
		conn.SetReadDeadline(next)
	} else {
		conn.SetWriteDeadline(next)
	}
	return nil
}
