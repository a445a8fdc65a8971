#include <stdio.h>
#include <cpuid.h>
static void dump(unsigned leaf, unsigned sub) {
  unsigned a, b, c, d;
  __cpuid_count(leaf, sub, a, b, c, d);
  printf("@@CPUID-%08x-%u=%08x %08x %08x %08x\n", leaf, sub, a, b, c, d);
}
int main(void) {
  unsigned l[] = {0, 1, 6, 0xa, 0x40000000, 0x40000001, 0x80000000, 0x80000001, 0x80000007, 0x80000008, 0x8000000a, 0x8000001f};
  for (unsigned i = 0; i < sizeof l / sizeof *l; i++) dump(l[i], 0);
  for (unsigned s = 0; s < 3; s++) dump(7, s);
  for (unsigned s = 0; s < 4; s++) dump(0xd, s);
  return 0;
}
