package integration

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runL4lb runs the binary (outside any namespace) and returns its exit
// code and output.
func runL4lb(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, l4lbBin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("l4lb %s: %v", strings.Join(args, " "), err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errOut.String()
}

// TestCheck runs `l4lb check` on testdata/good.toml and on every file of
// testdata/bad, whose expected messages are in the table below.
func TestCheck(t *testing.T) {
	t.Run("good", func(t *testing.T) {
		code, stdout, stderr := runL4lb(t, "check", "-config", "testdata/good.toml")
		if code != 0 || stderr != "" {
			t.Errorf("check good.toml: exit %d, stderr:\n%s\nstdout:\n%s\nwant exit 0 and no stderr", code, stderr, stdout)
		}
	})

	// Each want must appear in stderr, with FILE replaced by the path given
	// to -config: syntax errors are FILE:LINE:COL: and value errors
	// FILE: dotted.key: (0-based indexes).
	tests := []struct {
		file string
		want []string
	}{
		{"syntax.toml", []string{"FILE:6:12: "}},
		{"unknown_key.toml", []string{
			"FILE: services.pg.wieght: unknown key",
			"FILE: services.pg.backends[1].wieght: unknown key",
		}},
		{"bad_duration.toml", []string{"FILE: services.pg.connect_timeout: ", "3 seconds"}},
		{"port_range.toml", []string{
			"FILE: services.pg.listen: ", "70000",
			"FILE: services.pg.backends[1].address: ", "65536",
		}},
		{"duplicate_backend.toml", []string{"FILE: services.pg.backends[2].address: ", "duplicate"}},
		{"shared_listen.toml", []string{"FILE: services.b.listen: ", "services.a.listen"}},
		{"no_backends.toml", []string{"FILE: services.pg.backends: "}},
		{"weight_range.toml", []string{"FILE: services.pg.backends[0].weight: ", "1001"}},
		{"udp.toml", []string{"FILE: services.dns.max_flows: ", "out of range"}},
		{"hostname.toml", []string{"FILE: services.pg.backends[0].address: ", "db.internal"}},
		{"several.toml", []string{
			"FILE: services.pg.protocol: ",
			"FILE: services.pg.idle_timeout: ",
			"FILE: services.pg.wieght: unknown key",
			"FILE: services.pg.backends[0].weight: ",
		}},
	}

	// A bad file without a row would go untested.
	files, err := filepath.Glob("testdata/bad/*.toml")
	if err != nil {
		t.Fatal(err)
	}
	inTable := map[string]bool{}
	for _, tc := range tests {
		inTable[tc.file] = true
	}
	for _, f := range files {
		if !inTable[filepath.Base(f)] {
			t.Errorf("%s has no row in the table of TestCheck", f)
		}
	}

	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			path := filepath.Join("testdata", "bad", tc.file)
			if _, err := os.Stat(path); err != nil {
				t.Fatal(err)
			}
			code, _, stderr := runL4lb(t, "check", "-config", path)
			if code != 1 {
				t.Errorf("exit %d, want 1", code)
			}
			for _, w := range tc.want {
				if w = strings.ReplaceAll(w, "FILE", path); !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q", w)
				}
			}
			if t.Failed() {
				t.Logf("stderr:\n%s", stderr)
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		code, _, stderr := runL4lb(t, "check", "-config", "testdata/no-such-file.toml")
		if code != 1 || !strings.Contains(stderr, "no-such-file.toml") {
			t.Errorf("exit %d, stderr %q; want exit 1 naming the file", code, stderr)
		}
	})

	t.Run("run refuses a bad config", func(t *testing.T) {
		path := "testdata/bad/udp.toml"
		code, _, stderr := runL4lb(t, "run", "-config", path)
		if want := path + ": services.dns.max_flows: "; code != 1 || !strings.Contains(stderr, want) {
			t.Errorf("exit %d, stderr:\n%s\nwant exit 1 and %q", code, stderr, want)
		}
	})
}

func TestVersion(t *testing.T) {
	code, stdout, stderr := runL4lb(t, "version")
	if code != 0 || strings.TrimSpace(stdout) == "" {
		t.Errorf("l4lb version: exit %d, stdout %q, stderr %q; want exit 0 and a version", code, stdout, stderr)
	}
}
