package l4

import (
	"errors"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// pipeSize is what each borrowed pipe is asked to hold. Bigger pipes move
// more bytes per splice call on bulk transfers; the kernel only pins pages
// that are in flight, and a pipe is only held while bytes move (see
// direction), so an idle connection costs no pipe at all. 1 MiB is
// Go's own choice for io.Copy between sockets; the call fails harmlessly
// (leaving the 64 KiB default) above fs.pipe-max-size for non-root.
const pipeSize = 1 << 20

// pipe is a kernel pipe used as the zero-copy buffer between two sockets.
type pipe struct {
	r, w int
	// buffered is how many bytes sit in the pipe, moved in but not yet out.
	buffered int
}

// pipePool lends pipes to connections while they move bytes. A pipe is only
// put back empty. It is a bounded free list rather than a sync.Pool: pooled
// pipes hold descriptors, which must be closed when dropped, not whenever a
// GC gets to them.
//
// It also lends the read/write path's buffers (copy.go), from a sync.Pool:
// those hold no descriptor, and a per-P cache keeps Get and Put cheap.
type pipePool struct {
	free chan *pipe
	bufs sync.Pool // of *copyBuf
}

// maxIdlePipes bounds the pipes kept for reuse. Only connections moving
// bytes at this instant hold a pipe, so a few per core cover bursts; an
// idle empty pipe still costs two descriptors and some kernel memory.
const maxIdlePipes = 128

func newPipePool() *pipePool {
	pp := &pipePool{free: make(chan *pipe, maxIdlePipes)}
	pp.bufs.New = func() any { return new(copyBuf) }
	return pp
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

// fillPipe splices what src holds into d's pipe, borrowing one first.
func (c *proxyConn) fillPipe(d *direction, src int, sf *sockFlags) error {
	pipes := c.loop.pipes
	if d.pipe == nil {
		p, err := pipes.get()
		if err != nil {
			// Out of descriptors (or pipe memory): the bytes can still go
			// through the buffer, slower but without cutting the client.
			d.splicing = false
			return nil
		}
		d.pipe = p
	}
	n, err := rawSplice(src, d.pipe.w, pipeSize)
	switch {
	case err == unix.EINTR:
		return nil
	case (sf.urgent && err == unix.EAGAIN) || (err == nil && n == 0):
		// splice stops at the urgent mark and never passes it: at the
		// mark it says EAGAIN, or 0 once the FIN is in, with bytes still
		// behind it. read(2) steps over the urgent byte, so the direction
		// goes on in read/write mode, its socket still readable. A 0 is
		// taken for the mark even before EPOLLPRI tells of one (the event
		// can come after the bytes): read(2) then confirms a real EOF, at
		// the cost of one read per spliced stream's end.
		sf.urgent = false
		d.splicing = false
		if d.pipe.buffered == 0 {
			pipes.put(d.pipe)
			d.pipe = nil
		}
		return nil
	case err == unix.EAGAIN:
		sf.readable = false
		if d.pipe.buffered == 0 {
			// Nothing in flight: give the pipe back while we wait, so
			// idle connections hold none.
			pipes.put(d.pipe)
			d.pipe = nil
		}
		return nil
	case err != nil:
		return &net.OpError{Op: "splice", Net: "tcp", Err: os.NewSyscallError("splice", err)}
	}
	d.pipe.buffered += n
	c.count(d, n)
	if n < copyBufSize {
		// The burst is over: small chunks are cheaper through the buffer
		// (one read and one write, no pipe).
		d.splicing = false
	}
	return nil
}

// drainPipe splices what d's pipe holds on to dst.
func (c *proxyConn) drainPipe(d *direction, dst int, df *sockFlags) error {
	for d.pipe.buffered > 0 {
		n, err := rawSplice(d.pipe.r, dst, d.pipe.buffered)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			df.writable = false
			return nil
		case err != nil:
			return &writeError{&net.OpError{Op: "splice", Net: "tcp", Err: os.NewSyscallError("splice", err)}}
		}
		d.pipe.buffered -= n
		// A slow reader draining a full pipe is not idle.
		c.lastActive = c.loop.now
	}
	return nil
}

// rawSplice is a non-blocking splice(2) of up to n bytes from in to out,
// as a RawSyscall for the reasons rawRead gives (copy.go): both ends are
// non-blocking and SPLICE_F_NONBLOCK is set, so it never waits.
func rawSplice(in, out, n int) (int, error) {
	m, _, errno := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if errno != 0 {
		return 0, errno
	}
	return int(m), nil
}
