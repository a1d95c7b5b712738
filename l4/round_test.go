package l4

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRoundStress: more connections than the arena has slots (64),
// random chunk sizes around the 16 KiB splice threshold, random pauses,
// slow readers with tiny receive buffers (partial sends, EAGAIN, held
// buffers), and half-closes from the client with the backend half-closing
// back after its echo. Every byte must come back once, in order, then EOF.
func TestRoundStress(t *testing.T) { roundStress(t, false) }

// Small chunks only, so the read/write round carries most bytes.
func TestRoundStressSmallChunks(t *testing.T) { roundStress(t, true) }

func roundStress(t *testing.T, small bool) {
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 24<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				c.(*net.TCPConn).CloseWrite()
				// keep the socket open a little: the proxy must pass
				// the half-close on, not wait for a close
				time.Sleep(50 * time.Millisecond)
				return
			}
		}
	})
	addr, _ := startService(t, time.Minute, backend)
	const conns = 120
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(i)))
			slow := i%5 == 0
			d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
				if !slow {
					return nil
				}
				return rc.Control(func(fd uintptr) {
					unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096)
				})
			}}
			c, err := d.Dial("tcp", addr.String())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			total := 50_000 + rng.Intn(400_000)
			if small {
				total = 20_000 + rng.Intn(100_000)
			}
			sent := make([]byte, total)
			rng.Read(sent)
			got := make(chan []byte, 1)
			go func() {
				if slow {
					time.Sleep(300 * time.Millisecond)
				}
				b, _ := io.ReadAll(c)
				got <- b
			}()
			for off := 0; off < total; {
				var k int
				switch rng.Intn(4) {
				case 0:
					k = 1 + rng.Intn(100)
				case 1:
					k = 1 + rng.Intn(4000)
				case 2:
					k = copyBufSize - 50 + rng.Intn(100)
				default:
					k = 1 + rng.Intn(60_000)
				}
				if small {
					k = 1 + rng.Intn(3000)
				}
				k = min(k, total-off)
				if _, err := c.Write(sent[off : off+k]); err != nil {
					errs <- fmt.Errorf("conn %d write: %w", i, err)
					return
				}
				off += k
				if small || rng.Intn(3) == 0 {
					time.Sleep(time.Duration(rng.Intn(1500)) * time.Microsecond)
				}
			}
			c.(*net.TCPConn).CloseWrite()
			b := <-got
			if !bytes.Equal(b, sent) {
				first := -1
				for j := range min(len(b), len(sent)) {
					if b[j] != sent[j] {
						first = j
						break
					}
				}
				errs <- fmt.Errorf("conn %d (slow=%v): got %d bytes, sent %d, first difference at %d", i, slow, len(b), len(sent), first)
				return
			}
			errs <- nil
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}
