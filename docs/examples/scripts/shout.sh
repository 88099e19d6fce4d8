# Run by sh inside the container, in /task: the input is the file ./words,
# the output the file ./loud.
tr a-z A-Z < words > loud
