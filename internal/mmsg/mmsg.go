//go:build linux

// Package mmsg moves batches of UDP datagrams with recvmmsg(2) and
// sendmmsg(2): one system call for up to len(Batch.Bufs) datagrams.
//
// x/sys/unix has no wrapper for these calls, and golang.org/x/net/ipv4's
// ReadBatch allocates a net.Addr per datagram; this package calls them
// directly on a descriptor from syscall.RawConn and allocates nothing per
// call. The calls go through RawSyscall6: with MSG_DONTWAIT they never
// block, so the scheduler need not know about them, and entering them as
// blocking system calls (Syscall6) let Go's sysmon hand the goroutine's P
// to another thread whenever one took over 20 µs, which on the
// benchmark's VM was often: the futex wake-ups cost l4lb about 12% more
// CPU per datagram.
//
//	b := mmsg.NewBatch(32, 2048, false)
//	rc.Read(func(fd uintptr) bool {
//		n, err = b.Recv(int(fd))
//		return err != unix.EAGAIN // false: wait for the socket to be readable
//	})
//	for i := range n { handle(b.Bufs[i][:b.Lens[i]], b.Addr(i)) }
package mmsg

import (
	"net"
	"net/netip"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr of <sys/socket.h>: a msghdr and the length the
// kernel moved. Go pads it to the C layout on every architecture.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// Batch is a reusable set of datagram slots: a buffer, a length and an
// address each. Not safe for concurrent use.
type Batch struct {
	// Bufs are the slots' buffers. Recv fills them; before Send, point
	// Bufs[i] at the bytes to send (any slice; SetLen is not needed).
	Bufs [][]byte
	// Lens are the datagram lengths Recv read.
	Lens []int

	hdrs  []mmsghdr
	iovs  []unix.Iovec
	addrs []unix.RawSockaddrInet6 // big enough for either family
	inet6 bool                    // the socket is AF_INET6: addresses are sockaddr_in6
	own   [][]byte                // the buffers NewBatch made, to reset Bufs
	// zoneIndex and zone are the last scope id Addr turned into a zone,
	// so that a link-local peer's datagrams allocate nothing.
	zoneIndex uint32
	zone      string

	// segment: SendOne sends runs of equal-sized datagrams as one UDP GSO
	// send (Segment). control holds each header's UDP_SEGMENT message;
	// runEnd[g] is the slot after the g-th run of the last SendOne.
	segment bool
	control []byte
	runEnd  []int
	// segmentBelow: runs of datagrams this size or larger go unsegmented,
	// after the kernel refused to segment that size (EMSGSIZE, EINVAL on
	// older kernels: larger than the route's MTU allows); 0 for no bound.
	segmentBelow int
}

// NewBatch returns a batch of n slots of bufSize bytes each. inet6 says
// whether the socket it will be used on is AF_INET6 (then IPv4 peers are
// IPv4-mapped IPv6 addresses, as Go's net package reports them too).
func NewBatch(n, bufSize int, inet6 bool) *Batch {
	b := &Batch{
		Bufs:  make([][]byte, n),
		Lens:  make([]int, n),
		hdrs:  make([]mmsghdr, n),
		iovs:  make([]unix.Iovec, n),
		addrs: make([]unix.RawSockaddrInet6, n),
		inet6: inet6,
		own:   make([][]byte, n),
	}
	mem := make([]byte, n*bufSize)
	for i := range n {
		b.own[i] = mem[i*bufSize : (i+1)*bufSize : (i+1)*bufSize]
		b.Bufs[i] = b.own[i]
	}
	return b
}

// Len is the number of slots.
func (b *Batch) Len() int { return len(b.hdrs) }

// ResetBufs points every slot back at its own buffer, after Send used
// other slices.
func (b *Batch) ResetBufs() { copy(b.Bufs, b.own) }

// Recv reads up to Len datagrams waiting on the non-blocking socket fd
// without waiting, and returns how many it read; Bufs[i][:Lens[i]] and
// Addr(i) are the i-th. It returns unix.EAGAIN when none is waiting.
func (b *Batch) Recv(fd int) (int, error) {
	for i := range b.hdrs {
		buf := b.Bufs[i]
		b.iovs[i].Base = unsafe.SliceData(buf)
		b.iovs[i].SetLen(len(buf))
		h := &b.hdrs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&b.addrs[i]))
		h.Namelen = uint32(unsafe.Sizeof(b.addrs[i]))
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		h.Control = nil
		h.SetControllen(0)
		h.Flags = 0
	}
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[0])),
			uintptr(len(b.hdrs)), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		n := int(r)
		for i := range n {
			b.Lens[i] = int(b.hdrs[i].n)
		}
		return n, nil
	}
}

// Addr is the source address of the i-th datagram Recv read.
func (b *Batch) Addr(i int) netip.AddrPort {
	sa := &b.addrs[i]
	if sa.Family == unix.AF_INET {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), ntohs(sa4.Port))
	}
	ip := netip.AddrFrom16(sa.Addr)
	if sa.Scope_id != 0 {
		// Link-local peers: the zone is the interface index, as a number
		// (netip takes any zone, and SetAddr reads it back). An interface
		// name would cost a netlink dump per datagram: net does not cache
		// them.
		if sa.Scope_id != b.zoneIndex {
			b.zoneIndex, b.zone = sa.Scope_id, strconv.FormatUint(uint64(sa.Scope_id), 10)
		}
		ip = ip.WithZone(b.zone)
	}
	return netip.AddrPortFrom(ip, ntohs(sa.Port))
}

// SetAddr sets the destination of slot i for Send. On an AF_INET socket
// the address must be IPv4 (or IPv4-mapped); on AF_INET6 IPv4 addresses
// are mapped.
func (b *Batch) SetAddr(i int, ap netip.AddrPort) {
	sa := &b.addrs[i]
	ip := ap.Addr()
	if !b.inet6 {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Port: htons(ap.Port()), Addr: ip.Unmap().As4()}
		return
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: htons(ap.Port()), Addr: ip.As16()}
	if z := ip.Zone(); z != "" {
		if index, err := strconv.ParseUint(z, 10, 32); err == nil {
			sa.Scope_id = uint32(index) // as Addr writes it
		} else if ifi, err := net.InterfaceByName(z); err == nil {
			sa.Scope_id = uint32(ifi.Index)
		}
	}
}

// Send sends slots [from, to) on the non-blocking socket fd, slot i being
// Bufs[i] to the address SetAddr gave it (or to the connected peer when
// noAddr is true). It returns how many the kernel took; when that is fewer
// than to-from, err is the error of the first datagram not sent:
// unix.EAGAIN when the socket buffer is full (wait for it to be writable),
// another error for that one datagram (skip it and send the rest).
func (b *Batch) Send(fd, from, to int, noAddr bool) (int, error) {
	for i := from; i < to; i++ {
		buf := b.Bufs[i]
		b.iovs[i].Base = unsafe.SliceData(buf)
		b.iovs[i].SetLen(len(buf))
		h := &b.hdrs[i].hdr
		if noAddr {
			h.Name, h.Namelen = nil, 0
		} else {
			h.Name = (*byte)(unsafe.Pointer(&b.addrs[i]))
			h.Namelen = unix.SizeofSockaddrInet4
			if b.inet6 {
				h.Namelen = unix.SizeofSockaddrInet6
			}
		}
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		h.Control = nil
		h.SetControllen(0)
		h.Flags = 0
	}
	sent := from
	for sent < to {
		r, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[sent])),
			uintptr(to-sent), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return sent - from, e
		}
		if r == 0 {
			return sent - from, unix.EAGAIN
		}
		sent += int(r)
	}
	return sent - from, nil
}

// Segment makes SendOne send each run of equal-sized datagrams (the last
// of a run may be shorter) as one UDP GSO send (UDP_SEGMENT, Linux 4.18):
// the kernel builds, routes and passes down one packet for the run and
// cuts it into the datagrams only at the device, or, on loopback and veth,
// at the receiving socket, so the receiver still gets each datagram as it
// was. On the benchmark's loopback a flow's share of a batch is about four
// datagrams, and the stack's per-packet work was most of the proxy's CPU.
// It returns false, changing nothing, on a kernel without UDP_SEGMENT.
func (b *Batch) Segment() bool {
	if !segmentationSupported() {
		return false
	}
	b.segment = true
	b.control = make([]byte, len(b.hdrs)*segmentControlSpace)
	b.runEnd = make([]int, 0, len(b.hdrs))
	return true
}

const (
	// maxSegments is how many datagrams one segmented send may carry
	// (UDP_MAX_SEGMENTS: 64, raised to 128 by later kernels, 6.18 among
	// them; the smaller holds on all).
	maxSegments = 64
	// maxSegmentedBytes bounds a run's bytes: before segmentation it is
	// one IP packet, so its payload is at most 65507 bytes (IPv4, no
	// options).
	maxSegmentedBytes = 65507
)

// segmentControlSpace is the room of one UDP_SEGMENT control message: a
// cmsghdr and the uint16 segment size, aligned.
var segmentControlSpace = unix.CmsgSpace(2)

// SegmentationSupported says whether the kernel knows UDP_SEGMENT, which
// Segment needs.
func SegmentationSupported() bool { return segmentationSupported() }

// segmentationSupported says whether the kernel knows UDP_SEGMENT. An older
// kernel ignores control messages of a level it does not know, and would
// send a whole run as one datagram, so the option is asked for first.
var segmentationSupported = sync.OnceValue(func() bool {
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			continue
		}
		_, err = unix.GetsockoptInt(fd, unix.SOL_UDP, unix.UDP_SEGMENT)
		unix.Close(fd)
		return err == nil
	}
	return false
})

// SendOne is Send for slots that all go to one destination: the connected
// peer (noAddr) or the address of slot from. After Segment, it sends runs
// of equal-sized datagrams as one segmented send each; the count and the
// error mean what they mean for Send, counted in slots. A datagram the
// kernel refuses to segment (larger than the route's MTU allows, or a
// device path that cannot) makes the batch send that size, or everything,
// unsegmented from then on.
func (b *Batch) SendOne(fd, from, to int, noAddr bool) (int, error) {
	if !b.segment {
		if !noAddr {
			// Send reads each slot's address.
			for i := from + 1; i < to; i++ {
				b.addrs[i] = b.addrs[from]
			}
		}
		return b.Send(fd, from, to, noAddr)
	}
	// Run g's header is hdrs[from+g]: there are no more runs than slots, so
	// the headers stay within [from, to), as Send's do.
	b.runEnd = b.runEnd[:0]
	for i := from; i < to; {
		size := len(b.Bufs[i])
		end := i + 1
		if size > 0 && (b.segmentBelow == 0 || size < b.segmentBelow) {
			for total := size; end < to && end-i < maxSegments; end++ {
				next := len(b.Bufs[end])
				if next == 0 || next > size || total+next > maxSegmentedBytes {
					break
				}
				total += next
				if next < size {
					end++ // a shorter datagram ends its run
					break
				}
			}
		}
		for j := i; j < end; j++ {
			b.iovs[j].Base = unsafe.SliceData(b.Bufs[j])
			b.iovs[j].SetLen(len(b.Bufs[j]))
		}
		h := &b.hdrs[from+len(b.runEnd)].hdr
		h.Name, h.Namelen = nil, 0
		if !noAddr {
			h.Name = (*byte)(unsafe.Pointer(&b.addrs[from]))
			h.Namelen = unix.SizeofSockaddrInet4
			if b.inet6 {
				h.Namelen = unix.SizeofSockaddrInet6
			}
		}
		h.Iov = &b.iovs[i]
		h.SetIovlen(end - i)
		h.Control = nil
		h.SetControllen(0)
		h.Flags = 0
		if end-i > 1 {
			control := b.control[len(b.runEnd)*segmentControlSpace:][:segmentControlSpace]
			cmsg := (*unix.Cmsghdr)(unsafe.Pointer(&control[0]))
			cmsg.Level, cmsg.Type = unix.SOL_UDP, unix.UDP_SEGMENT
			cmsg.SetLen(unix.CmsgLen(2))
			*(*uint16)(unsafe.Pointer(&control[unix.CmsgLen(0)])) = uint16(size)
			h.Control = &control[0]
			h.SetControllen(segmentControlSpace)
		}
		b.runEnd = append(b.runEnd, end)
		i = end
	}
	runs, sentRuns := len(b.runEnd), 0
	slotsBefore := func(run int) int {
		if run == 0 {
			return from
		}
		return b.runEnd[run-1]
	}
	retried := false
	for sentRuns < runs {
		r, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[from+sentRuns])),
			uintptr(runs-sentRuns), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e == 0 && r == 0 {
			e = unix.EAGAIN
		}
		if e != 0 {
			start := slotsBefore(sentRuns)
			segmented := b.runEnd[sentRuns]-start > 1
			if segmented && e == unix.EMSGSIZE && !retried {
				// A connected socket reports an ICMP fragmentation needed
				// once, on its next send, whatever that send's size: only
				// a second EMSGSIZE is the kernel refusing this run.
				retried = true
				continue
			}
			if segmented && (e == unix.EMSGSIZE || e == unix.EINVAL || e == unix.EIO) {
				// EMSGSIZE (EINVAL on older kernels): the run's size does
				// not fit the route's MTU unfragmented; EINVAL: the socket
				// cannot segment (no UDP checksums); EIO: the path cannot
				// segment at all (IPsec, UDP-Lite).
				if e == unix.EIO {
					b.segment = false
				} else {
					b.segmentBelow = len(b.Bufs[start])
				}
				b.addrs[start] = b.addrs[from]
				k, err := b.SendOne(fd, start, to, noAddr)
				return start - from + k, err
			}
			return start - from, e
		}
		sentRuns += int(r)
	}
	return to - from, nil
}

func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func htons(p uint16) uint16 {
	var r uint16
	b := (*[2]byte)(unsafe.Pointer(&r))
	b[0], b[1] = byte(p>>8), byte(p)
	return r
}
