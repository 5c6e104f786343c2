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

// Parse parses args, the command line of the program fs is named after, into
// the flags defined on fs, then runs check (which should validate the
// program's flags, including ConnConfig.Validate). It returns ok when the
// program should run. Otherwise it returns the exit code:
//
//   - 0 after --help (or -h), which prints about (one line saying what the
//     program shows), a usage line and the flags to stdout;
//   - 2 for an undefined flag, a malformed value, a stray argument or an
//     error from check, printed to stderr as one line that names the flag.
func Parse(fs *flag.FlagSet, about string, args []string, stdout, stderr io.Writer, check func() error) (code int, ok bool) {
	// The flag package prints the whole usage on every error; one line is
	// what a user needs.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		printUsage(stdout, fs, about)
		return 0, false
	case err != nil:
	case fs.NArg() > 0:
		err = fmt.Errorf("unexpected argument %q (all options are --flags)", fs.Arg(0))
	default:
		err = check()
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %s (see --help)\n", fs.Name(), oneLine(err.Error()))
		return 2, false
	}
	return 0, true
}

// The checks of flag values, for a program's check (see Parse): each
// returns nil, or an error that names the flag and the value.

// AtLeast checks that the integer flag name (e.g. "--workers") is at least
// low.
func AtLeast(name string, n, low int) error {
	if n < low {
		return fmt.Errorf("%s: must be at least %d, got %d", name, low, n)
	}
	return nil
}

// Positive checks that the duration flag name is positive.
func Positive(name string, d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("%s: must be positive, got %v", name, d)
	}
	return nil
}

// NotNegative checks that the duration flag name is not negative.
func NotNegative(name string, d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("%s: must not be negative, got %v", name, d)
	}
	return nil
}

// FirstError returns the first of errs that is not nil: a program checks
// its flags in the order it reports them.
func FirstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
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

// Config is a demo's configuration, filled from its command line.
type Config interface {
	// Conn is where the connection flags go.
	Conn() *ConnConfig
	// Define defines the demo's own flags on fs.
	Define(fs *flag.FlagSet)
	// Check validates the demo's own flags once parsed (the connection
	// flags are checked after it); its errors name the flag.
	Check() error
}

// Program is the whole of a demo program named name, about being the first
// line of its --help: it parses args into a C (the connection flags and
// the demo's, see Config and Parse), then runs run with it under Main,
// printing to stdout. It returns the exit code (0 OK, 1 error or broken
// invariant, 2 bad flags).
func Program[C any, P interface {
	*C
	Config
}](name, about string, args []string, stdout, stderr io.Writer,
	run func(ctx context.Context, cfg C, out io.Writer) (bool, error),
) int {
	var cfg C
	p := P(&cfg)
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	p.Conn().Register(fs)
	p.Define(fs)
	if code, ok := Parse(fs, about, args, stdout, stderr, func() error {
		return FirstError(p.Check(), p.Conn().ValidateFlags())
	}); !ok {
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
