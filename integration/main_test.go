package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// l4lbBin is the binary under test. TestMain sets it before any test runs;
// nothing changes it afterwards.
var l4lbBin string

// tools are the programs the tests run, with the Debian package of each.
var tools = []struct{ name, pkg string }{
	{"ip", "iproute2"},
	{"iperf3", "iperf3"},
	{"nft", "nftables"},              // health_test.go: blackhole and reject backends
	{"redis-server", "redis-server"}, // health_test.go: send_expect PING/+PONG
	{"ss", "iproute2"},               // protect_test.go: no CLOSE-WAIT or FIN-WAIT-2 left
	{"prlimit", "util-linux"},        // protect_test.go: l4lb under a low RLIMIT_NOFILE
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	// Never skip: a run that silently tested nothing would look green.
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "integration tests need root for network namespaces; run as root, e.g. sudo make test")
		return 1
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool.name); err != nil {
			fmt.Fprintf(os.Stderr, "integration tests need %s: apt-get install %s (%v)\n", tool.name, tool.pkg, err)
			return 1
		}
	}
	removeStaleNamespaces()

	dir, err := os.MkdirTemp("", "l4lb-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	l4lbBin = filepath.Join(dir, "l4lb")
	build := exec.Command("go", "build", "-o", l4lbBin, "github.com/l4lb/l4lb/cmd/l4lb")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build l4lb: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// removeStaleNamespaces deletes the namespaces of earlier runs that were
// killed before their cleanups ran: their names carry the pid of a test
// process that no longer exists.
func removeStaleNamespaces() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return // no namespaces at all
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), nsPrefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			continue // that run is still going
		}
		if out, err := exec.Command("ip", "netns", "del", e.Name()).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "remove stale namespace %s: %v: %s", e.Name(), err, out)
		}
	}
}
