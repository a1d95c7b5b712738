package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The subcommands' arguments: -h is not an error, check takes the file as
// its argument too, and an argument nothing takes is refused instead of
// ignored.
func TestSubcommandArguments(t *testing.T) {
	good := filepath.Join(t.TempDir(), "l4lb.toml")
	if err := os.WriteFile(good, []byte("[services.db]\nlisten = \"127.0.0.1:5432\"\n[[services.db.backends]]\naddress = \"10.0.0.1:5432\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	nobody := filepath.Join(t.TempDir(), "user.toml")
	if err := os.WriteFile(nobody, []byte("[process]\nuser = \"no-such-user-l4lb\"\n[services.db]\nlisten = \"127.0.0.1:5432\"\n[[services.db.backends]]\naddress = \"10.0.0.1:5432\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args     []string
		code     int
		inOutput string
	}{
		{[]string{"check", good}, 0, "ok (1 services)"},
		{[]string{"check", "-config", good}, 0, "ok (1 services)"},
		{[]string{"check", "-config", good, good}, 2, "give the file once"},
		{[]string{"check", good, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"check", "-h"}, 0, "-config"},
		{[]string{"run", "-config", good, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"run", "-h"}, 0, "-pidfile file"},
		{[]string{"status", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"reload", "-admin", "127.0.0.1:1", "-pidfile", "/nonexistent"}, 2, "not both"},
		{[]string{"version"}, 0, "l4lb "},
		{[]string{"check", nobody}, 0, `warning: process.user "no-such-user-l4lb": no such user on this host`},
		{[]string{"run", "-config", nobody}, 1, `process.user "no-such-user-l4lb": no such user on this host`},
	} {
		var out bytes.Buffer
		code := runMain(c.args, &out, &out)
		if code != c.code || !strings.Contains(out.String(), c.inOutput) {
			t.Errorf("l4lb %s: exit %d, output %q; want exit %d and %q", strings.Join(c.args, " "), code, out.String(), c.code, c.inOutput)
		}
	}
}
