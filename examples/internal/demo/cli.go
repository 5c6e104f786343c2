package demo

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Flags is the command line of a demo program: a FlagSet, and the checks
// Program runs once it is parsed, in the order they were added (the bounds
// of IntAtLeast, PositiveDuration and NonNegativeDuration, and Check). Each
// check's error names its flag.
type Flags struct {
	*flag.FlagSet
	checks []func() error
}

// Check adds check to the checks of the parsed command line.
func (f *Flags) Check(check func() error) { f.checks = append(f.checks, check) }

// IntAtLeast defines an int flag that must be at least low.
func (f *Flags) IntAtLeast(p *int, name string, value, low int, usage string) {
	f.IntVar(p, name, value, usage)
	f.Check(func() error {
		if *p < low {
			return fmt.Errorf("--%s: must be at least %d, got %d", name, low, *p)
		}
		return nil
	})
}

// PositiveDuration defines a duration flag that must be positive.
func (f *Flags) PositiveDuration(p *time.Duration, name string, value time.Duration, usage string) {
	f.DurationVar(p, name, value, usage)
	f.Check(func() error {
		if *p <= 0 {
			return fmt.Errorf("--%s: must be positive, got %v", name, *p)
		}
		return nil
	})
}

// NonNegativeDuration defines a duration flag that must not be negative.
func (f *Flags) NonNegativeDuration(p *time.Duration, name string, value time.Duration, usage string) {
	f.DurationVar(p, name, value, usage)
	f.Check(func() error {
		if *p < 0 {
			return fmt.Errorf("--%s: must not be negative, got %v", name, *p)
		}
		return nil
	})
}

// MetricsAddr defines --metrics-addr, the address Setup serves /metrics at
// (empty: not served).
func (f *Flags) MetricsAddr(p *string) {
	f.StringVar(p, "metrics-addr", "", "serve /metrics on this address, e.g. 127.0.0.1:9090 (default: off)")
}

// parse parses args into the flags of fs, then runs its checks. It returns
// ok when the program should run. Otherwise it returns the exit code:
//
//   - 0 after --help (or -h), which prints about (one line saying what the
//     program shows), a usage line and the flags to stdout;
//   - 2 for an undefined flag, a malformed value, a stray argument or a
//     failed check, printed to stderr as one line that names the flag.
func parse(fs *Flags, about string, args []string, stdout, stderr io.Writer) (code int, ok bool) {
	// The flag package prints the whole usage on every error; one line is
	// what a user needs.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		printUsage(stdout, fs.FlagSet, about)
		return 0, false
	case err != nil:
	case fs.NArg() > 0:
		err = fmt.Errorf("unexpected argument %q (all options are --flags)", fs.Arg(0))
	default:
		for _, check := range fs.checks {
			if err = check(); err != nil {
				break
			}
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %s (see --help)\n", fs.Name(), oneLine(err.Error()))
		return 2, false
	}
	return 0, true
}

// printUsage writes the help text of fs to w: about on the first line, then
// a usage line and the flags with their defaults.
func printUsage(w io.Writer, fs *flag.FlagSet, about string) {
	fmt.Fprintln(w, about)
	fmt.Fprintf(w, "\nUsage: %s [flags]\n\nFlags:\n", fs.Name())
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// Program is the whole of the demo program name, about being the first line
// of its --help: define defines its flags on fs, storing into cfg (with
// cfg's ConnConfig registered on fs), then args is parsed into them and
// their checks are run, then run runs with the config under Main, printing
// to stdout. It returns the exit code (0 OK, 1 error or broken invariant, 2
// bad flags, printed to stderr as one line naming the flag; 0 after --help).
func Program[C any](name, about string, args []string, stdout, stderr io.Writer,
	define func(fs *Flags, cfg *C),
	run func(ctx context.Context, cfg C, out io.Writer) (bool, error),
) int {
	fs := &Flags{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError)}
	var cfg C
	define(fs, &cfg)
	if code, ok := parse(fs, about, args, stdout, stderr); !ok {
		return code
	}
	return Main(name, stderr, func(ctx context.Context) (bool, error) { return run(ctx, cfg, stdout) })
}

// Main runs a demo until it ends or SIGINT/SIGTERM and returns the process
// exit code: 0 when run reports that the invariants held, 1 otherwise (an
// error is printed to stderr on one line with the demo's name). A second
// Ctrl-C kills the process.
func Main(name string, stderr io.Writer, run func(ctx context.Context) (bool, error)) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// Restore the default handling once the first signal arrived.
		<-ctx.Done()
		stop()
	}()
	ok, err := run(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %s\n", name, oneLine(err.Error()))
		return 1
	}
	if !ok {
		return 1
	}
	return 0
}
