//go:build linux

package mmsg

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func listen(t *testing.T, addr string) (*net.UDPConn, syscall.RawConn) {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return c, rc
}

// recvAll reads with b until it holds want datagrams or a second passes.
func recvAll(t *testing.T, rc syscall.RawConn, b *Batch, want int) ([]string, []netip.AddrPort) {
	t.Helper()
	var got []string
	var from []netip.AddrPort
	deadline := time.Now().Add(time.Second)
	for len(got) < want && time.Now().Before(deadline) {
		var n int
		var rerr error
		rc.Control(func(fd uintptr) { n, rerr = b.Recv(int(fd)) })
		if rerr == unix.EAGAIN {
			time.Sleep(time.Millisecond)
			continue
		}
		if rerr != nil {
			t.Fatal(rerr)
		}
		for i := range n {
			got = append(got, string(b.Bufs[i][:b.Lens[i]]))
			from = append(from, b.Addr(i))
		}
	}
	return got, from
}

func TestBatchRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name, addr string
		inet6      bool
		sendFrom   string
	}{
		{name: "ipv4", addr: "127.0.0.1:0", sendFrom: "127.0.0.1:0"},
		{name: "ipv6", addr: "[::1]:0", inet6: true, sendFrom: "[::1]:0"},
		{name: "dual-stack", addr: "[::]:0", inet6: true, sendFrom: "127.0.0.1:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, src := listen(t, tc.addr)
			port := srv.LocalAddr().(*net.UDPAddr).AddrPort().Port()
			cli, crc := listen(t, tc.sendFrom)
			to := netip.AddrPortFrom(cli.LocalAddr().(*net.UDPAddr).AddrPort().Addr(), port)
			if to.Addr().IsUnspecified() {
				to = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
			}
			// Five datagrams into a batch of four: two receives.
			for i := range 5 {
				if _, err := cli.WriteToUDPAddrPort([]byte(fmt.Sprint("dgram", i)), to); err != nil {
					t.Fatal(err)
				}
			}
			b := NewBatch(4, 2048, tc.inet6)
			got, from := recvAll(t, src, b, 5)
			if fmt.Sprint(got) != "[dgram0 dgram1 dgram2 dgram3 dgram4]" {
				t.Fatalf("received %q", got)
			}
			want := cli.LocalAddr().(*net.UDPAddr).AddrPort()
			if tc.name == "dual-stack" {
				want = netip.AddrPortFrom(netip.AddrFrom16(want.Addr().As16()), want.Port())
			}
			for _, f := range from {
				if f != want {
					t.Fatalf("source %s, want %s", f, want)
				}
			}

			// Echo the last batch (one datagram) and a longer one back.
			b.Bufs[0] = []byte("reply0")
			b.Bufs[1] = bytes.Repeat([]byte{'y'}, 1500)
			b.SetAddr(0, from[0])
			b.SetAddr(1, from[0])
			var sent int
			var serr error
			src.Control(func(fd uintptr) { sent, serr = b.Send(int(fd), 0, 2, false) })
			if sent != 2 || serr != nil {
				t.Fatalf("sent %d, %v", sent, serr)
			}
			b.ResetBufs()
			rb := NewBatch(4, 2048, tc.sendFrom[0] == '[')
			got, _ = recvAll(t, crc, rb, 2)
			if len(got) != 2 || got[0] != "reply0" || len(got[1]) != 1500 {
				t.Fatalf("replies %d: %.20q", len(got), got)
			}
		})
	}
}

// TestBatchSendConnected sends on a connected socket without addresses,
// and a batch whose middle datagram is too large: Send stops before it, and
// sending from the next one goes on.
func TestBatchSendConnected(t *testing.T) {
	srv, src := listen(t, "127.0.0.1:0")
	c, err := net.DialUDP("udp", nil, srv.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	crc, _ := c.SyscallConn()
	b := NewBatch(3, 0, false)
	b.Bufs[0] = []byte("a")
	b.Bufs[1] = make([]byte, 70000) // over the UDP maximum: EMSGSIZE
	b.Bufs[2] = []byte("c")
	var got []int
	crc.Control(func(fd uintptr) {
		for i := 0; i < 3; {
			k, err := b.Send(int(fd), i, 3, true)
			got = append(got, k)
			i += k
			if err != nil {
				if err != unix.EMSGSIZE {
					t.Errorf("error %v, want EMSGSIZE", err)
				}
				i++
			}
		}
	})
	if fmt.Sprint(got) != "[1 1]" {
		t.Errorf("sent per call %v, want [1 1]", got)
	}
	r := NewBatch(4, 2048, false)
	msgs, _ := recvAll(t, src, r, 2)
	if fmt.Sprint(msgs) != "[a c]" {
		t.Errorf("received %q", msgs)
	}
}

func TestBatchRecvEmpty(t *testing.T) {
	_, rc := listen(t, "127.0.0.1:0")
	b := NewBatch(2, 64, false)
	var err error
	rc.Control(func(fd uintptr) { _, err = b.Recv(int(fd)) })
	if err != unix.EAGAIN {
		t.Fatalf("Recv on an empty socket: %v, want EAGAIN", err)
	}
}

func TestBatchAllocs(t *testing.T) {
	srv, src := listen(t, "127.0.0.1:0")
	to := srv.LocalAddr().(*net.UDPAddr).AddrPort()
	_, crc := listen(t, "127.0.0.1:0")
	sb := NewBatch(2, 0, false)
	rb := NewBatch(2, 64, false)
	msg := []byte("x")
	var n int
	send := func(fd uintptr) {
		sb.Bufs[0], sb.Bufs[1] = msg, msg
		sb.SetAddr(0, to)
		sb.SetAddr(1, to)
		n, _ = sb.Send(int(fd), 0, 2, false)
	}
	recv := func(fd uintptr) {
		for got := 0; got < n; {
			k, err := rb.Recv(int(fd))
			if err != nil {
				continue
			}
			_ = rb.Addr(0)
			got += k
		}
	}
	allocs := testing.AllocsPerRun(100, func() {
		crc.Control(send)
		src.Control(recv)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per send and receive, want 0", allocs)
	}
}

// A link-local peer's zone is its interface index, as a number, both ways:
// naming the interface cost a netlink dump per datagram.
func TestBatchLinkLocalZone(t *testing.T) {
	b := NewBatch(2, 64, true)
	b.addrs[0] = unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: htons(5353),
		Addr: netip.MustParseAddr("fe80::1").As16(), Scope_id: 7}
	got := b.Addr(0)
	if want := netip.MustParseAddrPort("[fe80::1%7]:5353"); got != want {
		t.Fatalf("Addr = %v, want %v", got, want)
	}
	if allocs := testing.AllocsPerRun(100, func() { b.Addr(0) }); allocs != 0 {
		t.Errorf("Addr of a link-local peer allocates %v times", allocs)
	}
	b.SetAddr(1, got)
	if sa := b.addrs[1]; sa.Scope_id != 7 || sa.Addr != got.Addr().As16() || ntohs(sa.Port) != 5353 {
		t.Errorf("SetAddr(%v) wrote scope %d, port %d", got, sa.Scope_id, ntohs(sa.Port))
	}
}

// groReceiver is a socket that takes segmented sends whole (UDP_GRO): each
// read is one send of the sender, with the segment size it was cut by, which
// shows how the datagrams travelled.
func groReceiver(t *testing.T, addr string) (netip.AddrPort, func() (n, segment int)) {
	t.Helper()
	c, rc := listen(t, addr)
	var err error
	rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1) })
	if err != nil {
		t.Fatalf("UDP_GRO: %v", err)
	}
	buf, oob := make([]byte, 1<<16), make([]byte, 64)
	return c.LocalAddr().(*net.UDPAddr).AddrPort(), func() (n, segment int) {
		var oobn int
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, oobn, _, _, err := c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_UDP && m.Header.Type == unix.UDP_GRO {
				segment = int(binary.NativeEndian.Uint32(m.Data))
			}
		}
		return n, segment
	}
}

// segmentSizes are datagrams that make runs: three of 100 and a shorter one
// that ends their run, 100 then 7 (a shorter last again), 7 alone (200 is
// longer), 200 alone (an empty datagram never joins a run), the empty one,
// and 3.
var segmentSizes = []int{100, 100, 100, 50, 100, 7, 7, 200, 0, 3}

func fillSegmentSlots(b *Batch) {
	for i, size := range segmentSizes {
		b.Bufs[i] = bytes.Repeat([]byte{byte('a' + i)}, size)
	}
}

// SendOne sends runs of equal-sized datagrams as one segmented send each,
// and every receiver still gets each datagram as it was sent, in order:
// a plain socket datagram by datagram, over a connected socket and to an
// address, IPv4 and from a dual-stack socket to an IPv4-mapped peer.
func TestSendOneSegmentsRuns(t *testing.T) {
	for _, tc := range []struct {
		name      string
		from      string
		inet6     bool
		connected bool
	}{
		{name: "connected", from: "127.0.0.1:0", connected: true},
		{name: "addressed", from: "127.0.0.1:0"},
		{name: "dual-stack", from: "[::]:0", inet6: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, src := listen(t, "127.0.0.1:0")
			to := srv.LocalAddr().(*net.UDPAddr).AddrPort()
			b := NewBatch(len(segmentSizes), 0, tc.inet6)
			if !b.Segment() {
				t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
			}
			fillSegmentSlots(b)
			var rc syscall.RawConn
			if tc.connected {
				c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				rc, _ = c.SyscallConn()
			} else {
				_, rc = listen(t, tc.from)
				b.SetAddr(0, to)
			}
			var sent int
			var err error
			rc.Control(func(fd uintptr) { sent, err = b.SendOne(int(fd), 0, len(segmentSizes), tc.connected) })
			if sent != len(segmentSizes) || err != nil {
				t.Fatalf("sent %d of %d: %v", sent, len(segmentSizes), err)
			}
			got, _ := recvAll(t, src, NewBatch(4, 2048, false), len(segmentSizes))
			var want []string
			for i, size := range segmentSizes {
				want = append(want, strings.Repeat(string(rune('a'+i)), size))
			}
			if !slices.Equal(got, want) {
				t.Fatalf("received %q\nwant     %q", got, want)
			}
		})
	}
}

// The runs travel as one packet each: a receiver that takes them whole
// (UDP_GRO) reads 6 sends for the 10 datagrams, cut as SendOne grouped them.
func TestSendOneSendsARunAsOnePacket(t *testing.T) {
	to, read := groReceiver(t, "127.0.0.1:0")
	_, rc := listen(t, "127.0.0.1:0")
	b := NewBatch(len(segmentSizes), 0, false)
	if !b.Segment() {
		t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
	}
	fillSegmentSlots(b)
	b.SetAddr(0, to)
	rc.Control(func(fd uintptr) { b.SendOne(int(fd), 0, len(segmentSizes), false) })
	var got []string
	for range 6 {
		n, segment := read()
		got = append(got, fmt.Sprintf("%d/%d", n, segment))
	}
	// A datagram sent alone has no segment size.
	if want := []string{"350/100", "107/100", "7/0", "200/0", "0/0", "3/0"}; !slices.Equal(got, want) {
		t.Errorf("sends (bytes/segment size) %v, want %v", got, want)
	}
}

// A run the kernel will not segment (here: a socket without UDP checksums,
// for which it refuses, as for a segment size above the route's MTU) goes
// out datagram by datagram, and so do later runs of that size or larger.
func TestSendOneFallsBackWhenRefused(t *testing.T) {
	srv, src := listen(t, "127.0.0.1:0")
	_, rc := listen(t, "127.0.0.1:0")
	var err error
	rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_NO_CHECK, 1) })
	if err != nil {
		t.Fatal(err)
	}
	b := NewBatch(len(segmentSizes), 0, false)
	if !b.Segment() {
		t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
	}
	for round := range 2 {
		fillSegmentSlots(b)
		b.SetAddr(0, srv.LocalAddr().(*net.UDPAddr).AddrPort())
		var sent int
		rc.Control(func(fd uintptr) { sent, err = b.SendOne(int(fd), 0, len(segmentSizes), false) })
		if sent != len(segmentSizes) || err != nil {
			t.Fatalf("round %d: sent %d of %d: %v", round, sent, len(segmentSizes), err)
		}
		if got, _ := recvAll(t, src, NewBatch(4, 2048, false), len(segmentSizes)); len(got) != len(segmentSizes) {
			t.Fatalf("round %d: received %d datagrams, want %d", round, len(got), len(segmentSizes))
		}
	}
	// 100 was refused, then 7 (its run came after): nothing above 6 is
	// grouped any more.
	if b.segmentBelow != 7 {
		t.Errorf("segmentBelow = %d, want 7", b.segmentBelow)
	}
}

// More equal datagrams than one send may carry make several runs.
func TestSendOneSplitsLongRuns(t *testing.T) {
	to, read := groReceiver(t, "127.0.0.1:0")
	_, rc := listen(t, "127.0.0.1:0")
	const n = maxSegments + 10
	b := NewBatch(n, 0, false)
	if !b.Segment() {
		t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
	}
	for i := range n {
		b.Bufs[i] = []byte("0123456789")
	}
	b.SetAddr(0, to)
	var sent int
	rc.Control(func(fd uintptr) { sent, _ = b.SendOne(int(fd), 0, n, false) })
	first, _ := read()
	second, _ := read()
	if sent != n || first != maxSegments*10 || second != 100 {
		t.Errorf("sent %d; read sends of %d and %d bytes, want %d and 100", sent, first, second, maxSegments*10)
	}
	send := func(fd uintptr) { b.SendOne(int(fd), 0, n, false) }
	if allocs := testing.AllocsPerRun(50, func() { rc.Control(send) }); allocs != 0 {
		t.Errorf("SendOne allocates %v times", allocs)
	}
}

// pathMTUAddr is a loopback address of these tests' own, for which they
// make the kernel learn a path MTU of pathMTU: it keeps a learned MTU for
// 10 minutes (net.ipv4.route.mtu_expires), which on 127.0.0.1 would make
// every later test's and benchmark's large datagrams fragment.
const (
	pathMTUAddr = "127.0.0.94"
	pathMTU     = 1200
)

// fragmentationNeeded sends, over loopback, the ICMP fragmentation needed
// (next-hop MTU pathMTU) a router would send about a datagram of c, a
// socket connected to pathMTUAddr, and returns once c has it as a pending
// error (EMSGSIZE) and the kernel has learned the MTU. Needs CAP_NET_RAW.
func fragmentationNeeded(t *testing.T, c *net.UDPConn) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
	if err != nil {
		t.Fatalf("raw socket (needs CAP_NET_RAW): %v", err)
	}
	defer unix.Close(fd)
	src, dst := c.LocalAddr().(*net.UDPAddr).AddrPort(), c.RemoteAddr().(*net.UDPAddr).AddrPort()
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	msg := []byte{3, 4, 0, 0, 0, 0, pathMTU >> 8, pathMTU & 0xff, // type, code, checksum, unused, MTU
		0x45, 0, 0, 128, 0, 0, 0x40, 0, 64, 17, 0, 0, // the datagram's IPv4 header
		s4[0], s4[1], s4[2], s4[3], d4[0], d4[1], d4[2], d4[3],
		byte(src.Port() >> 8), byte(src.Port()), byte(dst.Port() >> 8), byte(dst.Port()), 0, 108, 0, 0}
	var sum uint32
	for i := 0; i < len(msg); i += 2 {
		sum += uint32(msg[i])<<8 | uint32(msg[i+1])
	}
	sum = sum&0xffff + sum>>16
	sum += sum >> 16
	binary.BigEndian.PutUint16(msg[2:], ^uint16(sum))
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrInet4{Addr: s4}); err != nil {
		t.Fatal(err)
	}
	rc, _ := c.SyscallConn()
	pending := []unix.PollFd{{}}
	rc.Control(func(fd uintptr) {
		// Any poll reports a pending error as POLLERR.
		pending[0].Fd = int32(fd)
		_, err = unix.Poll(pending, 1000)
	})
	if err != nil || pending[0].Revents&unix.POLLERR == 0 {
		t.Fatalf("no error pending a second after the ICMP: %v", err)
	}
}

// A run whose size the route's MTU does not allow unfragmented, which the
// kernel refuses to segment (EMSGSIZE; EINVAL on older kernels), goes
// out datagram by datagram, fragmented, as Send would send it; a later run
// of a smaller size is still segmented.
func TestSendOneFallsBackAboveThePathMTU(t *testing.T) {
	to, read := groReceiver(t, pathMTUAddr+":0")
	probe, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	fragmentationNeeded(t, probe)
	_, rc := listen(t, "127.0.0.1:0")
	b := NewBatch(7, 0, false)
	if !b.Segment() {
		t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
	}
	for i := range 7 {
		b.Bufs[i] = make([]byte, pathMTU+100)
		if i >= 4 {
			b.Bufs[i] = make([]byte, pathMTU-100)
		}
	}
	b.SetAddr(0, to)
	var sent int
	rc.Control(func(fd uintptr) { sent, err = b.SendOne(int(fd), 0, 7, false) })
	if sent != 7 || err != nil {
		t.Fatalf("sent %d of 7: %v", sent, err)
	}
	var got []string
	for range 5 {
		n, segment := read()
		got = append(got, fmt.Sprintf("%d/%d", n, segment))
	}
	want := []string{"1300/0", "1300/0", "1300/0", "1300/0", "3300/1100"}
	if !slices.Equal(got, want) {
		t.Errorf("sends (bytes/segment size) %v, want %v", got, want)
	}
}

// A connected socket reports an ICMP error once, on its next send, whatever
// that send is: the fragmentation needed that a larger datagram earlier met
// is no refusal to segment a run of small ones, which still goes as one
// packet.
func TestSendOneSegmentsAfterAPendingError(t *testing.T) {
	to, read := groReceiver(t, pathMTUAddr+":0")
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fragmentationNeeded(t, c)
	b := NewBatch(4, 0, false)
	if !b.Segment() {
		t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
	}
	for i := range 4 {
		b.Bufs[i] = make([]byte, 100)
	}
	rc, _ := c.SyscallConn()
	var sent int
	rc.Control(func(fd uintptr) { sent, err = b.SendOne(int(fd), 0, 4, true) })
	if sent != 4 || err != nil {
		t.Fatalf("sent %d of 4: %v", sent, err)
	}
	if n, segment := read(); n != 400 || segment != 100 {
		t.Errorf("read a send of %d bytes in segments of %d, want 400 in segments of 100", n, segment)
	}
	if b.segmentBelow != 0 {
		t.Errorf("segmentBelow = %d after a pending error, want 0 (no bound)", b.segmentBelow)
	}
}

// SendOne sends every slot to slot from's address also where it does not
// segment: after the path refused to segment at all (EIO, here for a
// UDP-Lite socket), and in a batch that was never told to (Segment).
func TestSendOneAddressesAllAsSlotFrom(t *testing.T) {
	for _, tc := range []struct {
		name    string
		proto   int
		segment bool
	}{
		{name: "refused", proto: unix.IPPROTO_UDPLITE, segment: true},
		{name: "unsegmented", proto: unix.IPPROTO_UDP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socket := func() int {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, tc.proto)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { unix.Close(fd) })
				if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
					t.Fatal(err)
				}
				return fd
			}
			srv, cli := socket(), socket()
			sa, err := unix.Getsockname(srv)
			if err != nil {
				t.Fatal(err)
			}
			to := netip.AddrPortFrom(netip.AddrFrom4(sa.(*unix.SockaddrInet4).Addr), uint16(sa.(*unix.SockaddrInet4).Port))
			b := NewBatch(4, 0, false)
			if tc.segment && !b.Segment() {
				t.Fatal("the kernel has no UDP_SEGMENT (Linux 4.18)")
			}
			for i := range 4 {
				b.Bufs[i] = []byte("same size")
			}
			b.SetAddr(0, to)
			if sent, err := b.SendOne(cli, 0, 4, false); sent != 4 || err != nil {
				t.Errorf("sent %d of 4: %v", sent, err)
			}
			unix.SetsockoptTimeval(srv, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1})
			buf := make([]byte, 64)
			for i := range 4 {
				n, _, err := unix.Recvfrom(srv, buf, 0)
				if err != nil {
					t.Fatalf("datagram %d: %v", i, err)
				}
				if string(buf[:n]) != "same size" {
					t.Fatalf("datagram %d: %q", i, buf[:n])
				}
			}
		})
	}
}
