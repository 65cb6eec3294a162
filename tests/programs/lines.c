/* lines: writes "N wN PAD" (PAD: 80 x's, so that a pipe holds a few
 * hundred lines) for N = 1..count on stdout, one line at a time, blocking
 * whenever the pipe it writes to is full.
 *
 *   lines COUNT
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    long count = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long n = 1; n <= count; n++)
        if (printf("%ld w%ld %s\n", n, n, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx") < 0)
            return 1;
    return 0;
}
