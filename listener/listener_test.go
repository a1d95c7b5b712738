package listener

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestListenTCPSharesPortAcrossSockets(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			lns, err := ListenTCP(context.Background(), netip.AddrPortFrom(netip.MustParseAddr(host), 0), 1)
			if err != nil {
				t.Fatal(err)
			}
			// Port 0 picks a port for the first socket; bind three more to it.
			port := lns[0].Addr().(*net.TCPAddr).AddrPort().Port()
			lns[0].Close()
			addr := netip.AddrPortFrom(netip.MustParseAddr(host), port)
			lns, err = ListenTCP(context.Background(), addr, 4)
			if err != nil {
				t.Fatal(err)
			}
			accepted := make(chan int, 64)
			var wg sync.WaitGroup
			var files []*os.File
			for i, ln := range lns {
				fd, err := Detach(ln)
				if err != nil {
					t.Fatal(err)
				}
				f := os.NewFile(uintptr(fd), "listener") // on the netpoller: fd is non-blocking
				files = append(files, f)
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						c, err := acceptWait(f)
						if err != nil {
							return
						}
						accepted <- i
						go echoRaw(c.FD)
					}
				}()
			}
			// Different source ports hash to different sockets; with 64
			// connections over 4 sockets, at least two must be used.
			for range 64 {
				c, err := net.Dial("tcp", addr.String())
				if err != nil {
					t.Fatal(err)
				}
				c.Write([]byte("x"))
				buf := make([]byte, 1)
				if _, err := io.ReadFull(c, buf); err != nil || buf[0] != 'x' {
					t.Fatalf("echo through socket failed: %v", err)
				}
				c.Close()
			}
			used := map[int]bool{}
			for range 64 {
				used[<-accepted] = true
			}
			if len(used) < 2 {
				t.Errorf("64 connections all went to one of 4 sockets: %v", used)
			}
			for _, f := range files {
				f.Close()
			}
			wg.Wait()
		})
	}
}

// TestListenTCPWildcardFamilies checks which clients each wildcard takes:
// 0.0.0.0 only IPv4 ones, as in HAProxy and nginx (Go's "tcp" would make
// it a dual-stack [::] socket), [::] both families.
func TestListenTCPWildcardFamilies(t *testing.T) {
	for _, tt := range []struct {
		listen, bound string
		ipv6Clients   bool
	}{
		{listen: "0.0.0.0", bound: "0.0.0.0", ipv6Clients: false},
		{listen: "::", bound: "::", ipv6Clients: true},
	} {
		t.Run(tt.listen, func(t *testing.T) {
			lns, err := ListenTCP(context.Background(), netip.AddrPortFrom(netip.MustParseAddr(tt.listen), 0), 1)
			if err != nil {
				t.Fatal(err)
			}
			defer lns[0].Close()
			bound := lns[0].Addr().(*net.TCPAddr).AddrPort()
			if bound.Addr().String() != tt.bound {
				t.Errorf("bound %s, want %s", bound, tt.bound)
			}
			// A dial succeeds once the kernel queues the connection on
			// the listening socket; nothing else listens on the port.
			for _, client := range []struct {
				host string
				want bool
			}{{"127.0.0.1", true}, {"::1", tt.ipv6Clients}} {
				c, err := net.DialTimeout("tcp", net.JoinHostPort(client.host, fmt.Sprint(bound.Port())), 2*time.Second)
				if err == nil {
					c.Close()
				}
				if got := err == nil; got != client.want {
					t.Errorf("a client from %s connected: %v, want %v (dial error: %v)", client.host, got, client.want, err)
				}
			}
		})
	}
}

func TestListenTCPBusyAddressClosesAll(t *testing.T) {
	plain, err := net.Listen("tcp", "127.0.0.1:0") // no SO_REUSEPORT: blocks the group
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	addr := plain.Addr().(*net.TCPAddr).AddrPort()
	if _, err := ListenTCP(context.Background(), addr, 2); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("want EADDRINUSE, got %v", err)
	}
}

// TestReusePortGroupBelongsToItsUser shows the kernel rule that l4's
// Server works around with process.user: a socket joins a port's
// SO_REUSEPORT group only if the same user bound the group. The group is
// bound as root, then one thread switches user (a raw setresuid affects
// that thread alone) and binds again.
func TestReusePortGroupBelongsToItsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (make test runs as root), to bind as one user and then as another")
	}
	lns, err := ListenTCP(context.Background(), netip.MustParseAddrPort("127.0.0.1:0"), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer lns[0].Close()
	addr := lns[0].Addr().(*net.TCPAddr).AddrPort()
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: Go ends the thread with the goroutine, so no
		// other goroutine runs as that user.
		runtime.LockOSThread()
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, 65534, 65534, 0); e != 0 {
			errc <- e
			return
		}
		more, err := ListenTCP(context.Background(), addr, 1)
		if err == nil {
			more[0].Close()
		}
		errc <- err
	}()
	if err := <-errc; !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("binding %s as uid 65534 next to root's socket: %v, want EADDRINUSE", addr, err)
	}
}

func TestBackoffDoublesToItsBound(t *testing.T) {
	var b Backoff
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i, w := range want {
		if got := b.Next(); got != w*time.Millisecond {
			t.Errorf("wait %d = %v, want %v", i, got, w*time.Millisecond)
		}
	}
	b.Reset()
	if got := b.Next(); got != minAcceptBackoff {
		t.Errorf("after Reset: %v, want %v", got, minAcceptBackoff)
	}
}

func TestIsTransient(t *testing.T) {
	for _, err := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED,
		&net.OpError{Op: "accept", Err: &os.SyscallError{Syscall: "accept4", Err: syscall.EMFILE}}} {
		if !IsTransient(err) {
			t.Errorf("%v: not transient", err)
		}
	}
	if IsTransient(syscall.EBADF) {
		t.Error("EBADF reported transient")
	}
}

// Accepted sockets get keepalive and TCP_NODELAY from the listening socket
// alone: AcceptRaw sets no option per connection.
func TestAcceptedSocketsInheritKeepalive(t *testing.T) {
	lns, err := ListenTCP(context.Background(), netip.MustParseAddrPort("127.0.0.1:0"), 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lns[0].Close() })
	c, err := net.Dial("tcp", lns[0].Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fd, err := Detach(lns[0])
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "listener")
	t.Cleanup(func() { f.Close() })
	a, err := acceptWait(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(a.FD) })
	if want := c.LocalAddr().(*net.TCPAddr).AddrPort(); a.Peer != want {
		t.Errorf("accepted peer %v, want %v", a.Peer, want)
	}
	for _, o := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	} {
		var got int
		var gerr error
		got, gerr = unix.GetsockoptInt(a.FD, o.level, o.opt)
		if gerr != nil || got != o.want {
			t.Errorf("accepted socket %s = %d (%v), want %d", o.name, got, gerr, o.want)
		}
	}
}

// echoRaw echoes a raw accepted socket until EOF, then closes it. The
// socket is non-blocking; os.NewFile puts it on Go's netpoller.
func echoRaw(fd int) {
	f := os.NewFile(uintptr(fd), "accepted")
	defer f.Close()
	io.Copy(f, f)
}

// acceptWait accepts from a detached listener wrapped in an *os.File,
// parking on the netpoller while no connection waits.
func acceptWait(f *os.File) (Conn, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return Conn{}, err
	}
	var c Conn
	var sa unix.RawSockaddrAny
	var acceptErr error
	err = rc.Read(func(fd uintptr) bool {
		c, acceptErr = Accept(int(fd), &sa)
		return acceptErr != unix.EAGAIN
	})
	if err != nil {
		return Conn{}, err
	}
	return c, acceptErr
}
